"""`ray job submit --working-dir . -- python jobs/pretrain_vit4k.py --out S3_URI [--slides …] [key=value …]`

A thin entry point over `hipt-ray pretrain --stage vit4k`; rerunning the same run name resumes it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the submitted working dir

from hipt_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pretrain", "--stage", "vit4k", *sys.argv[1:]]))
