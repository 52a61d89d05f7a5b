"""The tables a run reads and writes, and the one owner of each kind of their state:

    paths.py     where every table of an output lives (TablePaths: one naming scheme)
    identity.py  what made an output table (TableIdentity <-> its embed.* properties)
    delta.py     Delta mechanics: snapshots, txn ids, tagged commits, MERGE, appends
    runs.py      the runs table: one reader (delta-rs, else Spark) and the recorder's rows
"""
