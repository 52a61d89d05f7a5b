/*
 * Delta log commits to S3 as create-if-absent PUTs (If-None-Match: *).
 *
 * Delta's own S3SingleDriverLogStore checks that commit N is absent (a HEAD), then
 * PUTs it: two drivers committing N at once both pass the check and the second PUT
 * replaces the first, losing a commit. Here the PUT itself is conditional (S3A's
 * fs.option.create.conditional.overwrite), so the store refuses the second one
 * (412) and Delta sees FileAlreadyExistsException: its usual conflict check then
 * retries the commit at N+1 or fails it. Needs a store with conditional writes
 * (AWS S3 since 2024, and most S3-compatible stores); embed-pipeline probes the
 * bucket before a run writes (pipeline/spark.py).
 *
 * Built by `embed setup-spark --storage s3` (pipeline/jars.py) against the installed
 * pyspark's Hadoop and Delta's delta-storage; set as spark.delta.logStore.s3a.impl.
 */
package io.embedpipeline.delta;

import io.delta.storage.HadoopFileSystemLogStore;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.FileAlreadyExistsException;
import java.util.Iterator;
import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.fs.FSDataOutputStream;
import org.apache.hadoop.fs.FSDataOutputStreamBuilder;
import org.apache.hadoop.fs.FileSystem;
import org.apache.hadoop.fs.Path;
import org.apache.hadoop.fs.s3a.RemoteFileChangedException;

public class ConditionalS3LogStore extends HadoopFileSystemLogStore {
  static final String CONDITIONAL = "fs.option.create.conditional.overwrite";

  public ConditionalS3LogStore(Configuration hadoopConf) {
    super(hadoopConf);
  }

  @Override
  public void write(Path path, Iterator<String> actions, Boolean overwrite,
                    Configuration hadoopConf) throws IOException {
    FileSystem fs = path.getFileSystem(hadoopConf);
    FSDataOutputStreamBuilder<?, ?> builder = fs.createFile(path).overwrite(overwrite);
    if (!overwrite) {
      builder = builder.must(CONDITIONAL, true);
    }
    try (FSDataOutputStream out = builder.build()) {
      while (actions.hasNext()) {
        out.write((actions.next() + "\n").getBytes(StandardCharsets.UTF_8));
      }
    } catch (org.apache.hadoop.fs.FileAlreadyExistsException | RemoteFileChangedException e) {
      throw new FileAlreadyExistsException(path.toString());
    }
  }

  @Override
  public Boolean isPartialWriteVisible(Path path, Configuration hadoopConf) {
    return false;  // an object appears whole or not at all
  }
}
