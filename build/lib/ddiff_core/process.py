"""How a script's process ends."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Callable, NoReturn


def run_process(main: Callable[[], int]) -> NoReturn:
    """Runs a script's ``main`` and ends the process with its exit code.

    A process of a multi-process run neither destroys its process group nor tears the interpreter down: destroying a
    Gloo group joins its worker threads while holding the GIL, and a worker still freeing the last collective's tensors
    waits for that GIL, so a finished run could hang forever (pytorch/pytorch#56297; seen here in 1 run of 4 under
    2-process CPU DDP). Everything the run writes is closed by then; the standard streams and logging are flushed here.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(main())
    try:
        code = main()
    except Exception:
        traceback.print_exc()
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
