"""The cyclic garbage collector's settings for a long-running server process (``whatrack serve``).

A webhook delivery allocates a few hundred objects that die young (the parsed body, the event, the row, the realtime
publication); nearly none of them sit in a reference cycle, and reference counting frees them already. With Python's
defaults a young collection ran every 700 allocations and the older generations kept scanning what start-up left
(modules, the SQLAlchemy and pydantic models): 5.3 % of the endpoint's CPU at saturation by ``gc.callbacks`` (0.61 s
of 11.5 s in a ``bench/webhook.py -c 256`` run), and the server's CPU per message in that bench fell from 0.21 to 0.17
ms with the settings below, more than that share.
"""

from __future__ import annotations

import gc

#: Allocations between two young-generation collections in a serving process (Python's default: 700).
GEN0_THRESHOLD = 20_000


def tune_for_serving() -> None:
    """Call once, at the end of start-up, in a process whose only work is serving.

    What start-up built is moved out of the collector's sight (``gc.freeze``: it lives as long as the process
    anyway), and the young generation is collected every :data:`GEN0_THRESHOLD` allocations: 0.077 s of collection in
    22.2 s of the endpoint's CPU over a whole ``bench/webhook.py`` sweep (0.35 %). Cycles are still collected, later;
    the process's RSS stayed the same in that bench (127-130 MB). Not for a process that embeds the app (a test): it
    would keep what is frozen.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, *gc.get_threshold()[1:])
