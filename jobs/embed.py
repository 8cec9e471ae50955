"""`ray job submit --working-dir . -- python jobs/embed.py --slides S3_PREFIX --out S3_URI
--checkpoint-256 URI --checkpoint-4k URI [key=value …]`

A thin entry point over `hipt-ray embed`; inside a Ray job RAY_ADDRESS points at the cluster.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the submitted working dir

from hipt_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
