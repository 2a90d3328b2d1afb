"""`python -m open_clip_train.main` with one compatibility fix, for the throughput comparison.

open_clip_train 3.3.0 groups tar members into samples itself and reads every item's "fname";
webdataset 1.0 (pinned here) yields an end-of-shard marker `{}` between shards, so open_clip_train
stops at the first shard's end with `KeyError: 'fname'`. Here its expander is called with
`eof_value=None`, which is how webdataset behaved before 1.0. Nothing else changes.

    python benchmarks/open_clip_train_compat.py --train-data ... (open_clip_train's arguments)
"""

import functools
import sys

import open_clip_train.data
from webdataset.tariterators import tar_file_expander

open_clip_train.data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)

from open_clip_train.main import main  # noqa: E402  (after the fix it needs)

if __name__ == "__main__":
    main(sys.argv[1:])
