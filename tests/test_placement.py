"""GPU placement as a pure function of the cluster (pipeline.placement), for the
layouts a GPU job meets, and the Spark side: what a live session observes, and a
worker that never holds two copies of one model."""

from __future__ import annotations

import pytest

from pipeline.placement import ClusterView, local_slots, plan


def local16(gpus: int, **kw) -> ClusterView:
    return ClusterView(master="local[*]", machine_cores=16, slots=16, cuda_devices=gpus, **kw)


def test_local_16_cores_without_gpus_runs_one_task_per_core():
    p = plan(local16(0))
    assert (p.kind, p.encode_tasks, p.torch_threads, p.tokenizer_threads) == (
        "local-cpu", 16, 1, 1)
    assert p.gpu_for(5, None) is None and p.token_budget is None
    assert p.task_gpu_amount is None


def test_local_16_cores_one_gpu_runs_one_encode_task_not_sixteen():
    p = plan(local16(1))
    assert (p.kind, p.encode_tasks, p.gpus) == ("local-gpu", 1, 1)
    assert (p.torch_threads, p.tokenizer_threads) == (16, 16)
    assert p.token_budget == 65536
    assert {p.gpu_for(i, None) for i in range(4)} == {"0"}


def test_local_16_cores_eight_gpus_uses_every_gpu():
    p = plan(local16(8))
    assert (p.encode_tasks, p.torch_threads) == (8, 2)
    assert [p.gpu_for(i, None) for i in range(10)] == [str(i % 8) for i in range(10)]
    assert "8 encode tasks on 8 GPU(s)" in p.label


def test_two_tasks_per_gpu_share_its_budget():
    p = plan(local16(8, tasks_per_gpu=2))
    assert (p.encode_tasks, p.torch_threads, p.token_budget) == (16, 1, 32768)
    assert [p.gpu_for(i, None) for i in (0, 8, 15)] == ["0", "0", "7"]


def test_device_cpu_ignores_the_gpus_and_a_configured_budget_wins():
    assert plan(local16(8, device="cpu")).kind == "local-cpu"
    assert plan(local16(1, token_budget=8192)).token_budget == 8192


def test_local_slots_fewer_than_gpus_caps_the_tasks():
    view = ClusterView(master="local[2]", machine_cores=16, slots=2, cuda_devices=8)
    assert plan(view).encode_tasks == 2


@pytest.mark.parametrize("master", ["spark://10.0.0.1:7077", "yarn", "k8s://https://api:6443"])
@pytest.mark.parametrize("executor_gpus, task_gpus, per_executor, per_gpu", [
    (1, 1, 1, 1), (1, 0.5, 2, 2), (4, 1, 4, 1), (4, 0.5, 8, 2)])
def test_cluster_gpus_come_from_spark(master, executor_gpus, task_gpus, per_executor,
                                      per_gpu):
    view = ClusterView(master=master, machine_cores=16, slots=16,
                       executor_gpus=executor_gpus, task_gpus=task_gpus)
    p = plan(view)
    assert (p.kind, p.gpu_from, p.task_gpu_amount) == ("cluster-gpu", "task-resources",
                                                       task_gpus)
    assert p.encode_tasks is None  # Spark's scheduler limits the tasks per executor
    assert (p.gpus, p.tasks_per_gpu) == (executor_gpus, per_gpu)
    assert p.torch_threads == 16 // per_executor
    assert p.token_budget == 65536 // per_gpu
    assert p.gpu_for(3, "1") == "1"  # the address Spark assigned, whatever the partition


def test_cluster_gpus_without_a_task_amount_get_one_per_task():
    view = ClusterView(master="yarn", machine_cores=8, slots=8, executor_gpus=2)
    p = plan(view)
    assert (p.task_gpu_amount, p.torch_threads) == (1.0, 4)
    assert plan(ClusterView(master="yarn", machine_cores=8, slots=8, executor_gpus=2,
                            tasks_per_gpu=2)).task_gpu_amount == 0.5


def test_cluster_without_gpus_uses_task_cpus():
    p = plan(ClusterView(master="yarn", machine_cores=8, slots=4, task_cpus=2))
    assert (p.kind, p.torch_threads, p.task_gpu_amount) == ("cluster-cpu", 2, None)


def test_local_slots_parsing():
    assert [local_slots(m, 16) for m in ("local", "local[4]", "local[*]", "local[3,2]",
                                         "yarn")] == [1, 4, 16, 3, None]


def test_a_live_local_session_observes_cores_and_no_gpu(spark, tmp_path):
    from pipeline import udf
    from pipeline.config import load_config
    from tests.conftest import write_config

    cfg = load_config(write_config(tmp_path, "src", str(tmp_path / "out")))
    view = udf.observe(spark, cfg)
    assert (view.master, view.slots, view.cuda_devices) == ("local[2]", 2, 0)
    placed = udf.placement_for(spark, cfg)
    assert (placed.kind, placed.encode_tasks) == ("local-cpu", 2)
    assert udf.gpu_profile(spark, placed) is None
    forced = udf.placement_for(spark, load_config(
        write_config(tmp_path, "src", str(tmp_path / "out")), ["spark.torch_threads=3"]))
    assert forced.torch_threads == 3


def test_a_worker_keeps_one_copy_of_a_model(model_dir):
    from pipeline import udf
    from pipeline.config import ModelConfig, OutputSpec

    udf._ENCODERS.clear()
    model = ModelConfig(name_or_path=str(model_dir))
    outputs = (OutputSpec(name="e", dim=64),)
    first = udf.get_encoder(model, outputs, None)
    assert udf.get_encoder(model, outputs, None) is first
    udf.get_encoder(model, outputs, "1")  # the same model asked for on another GPU
    assert len(udf._ENCODERS) == 1 and (model, outputs, "1", None) in udf._ENCODERS
    udf._ENCODERS.clear()


def test_the_encode_profile_asks_executors_only_under_dynamic_allocation():
    from pipeline.udf import profile_requests

    assert profile_requests(False, "4", 0.5) == (None, 0.5)  # task-only: default executors
    assert profile_requests(True, "4", 0.5) == (4, 0.5)
