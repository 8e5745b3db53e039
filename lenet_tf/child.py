"""The start of a helper process that must not outlive its parent (see io_utils.run_module_in_child).

Usage: python -m lenet_tf.child PARENT_PID MODULE [ARGUMENT ...]

On Linux the child asks the kernel for SIGKILL when its parent exits
(PR_SET_PDEATHSIG), then runs MODULE as `python -m MODULE ARGUMENT ...` would.
Elsewhere it is an ordinary child.
"""

import os
import runpy
import signal
import sys


def die_with_parent(parent_pid: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    set_parent_death_signal = 1  # PR_SET_PDEATHSIG in <linux/prctl.h>.
    ctypes.CDLL(None, use_errno=True).prctl(set_parent_death_signal, signal.SIGKILL)
    if os.getppid() != parent_pid:
        # The parent died before the request above took effect.
        os._exit(1)


def main(argv: list[str]) -> None:
    parent_pid, module, *arguments = argv
    die_with_parent(int(parent_pid))
    sys.argv = [module, *arguments]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
