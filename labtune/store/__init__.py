"""The store room: where every stage's output lives and how it gets there.

- `backends`: the local folder and S3 backends behind one `Store` interface, `open_store`;
- `hashing`: content hashes of written and source files, remembered so big files are read once;
- `outputs`: the output contract: content-addressed keys, manifests written last, fetch and publish,
  `run_stage` (build, verify, commit, or skip when a manifest is there);
- `lease`: one writer per stage output; `housekeeping`: run records, usage, `labtune store gc`;
- `local_s3`: a local S3 endpoint (moto) for the stack and the tests.

May import: labtune.errors, labtune.plots (and the version in labtune).
"""
