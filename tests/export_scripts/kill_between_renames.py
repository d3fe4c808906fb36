"""Export a small calibrated model and SIGKILL the process right after the first file of the
artifact set is renamed into place, as the OOM killer or a preempted node would: no ``finally``
runs, the remaining temporaries stay behind.

Usage: python kill_between_renames.py PATH SEED   (see tests/test_export_hostile.py)
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from test_export_hostile import calibrated_mlp

import qat

if __name__ == "__main__":
    target, seed = Path(sys.argv[1]).resolve(), int(sys.argv[2])
    rename = os.replace

    def replace_then_die(source, destination, *args, **kwargs):
        rename(source, destination, *args, **kwargs)
        if Path(destination).resolve().parent == target.parent:  # the first rename of the artifact set
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace_then_die
    torch.manual_seed(seed)
    qat.export_onnx(calibrated_mlp(seed), torch.randn(8, 64), target)
    sys.exit("the export finished: it should have been killed after its first rename")
