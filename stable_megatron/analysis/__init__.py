"""Reading finished or running runs: their logs (`runs.py`), the LR sweep's summary
(`sweep_table.py`) and the plots (`plotting.py`, used by `stable_megatron/report.py`).

Nothing here imports torch, megatron-core or DeepSpeed: a log can be read and plotted on any
machine with numpy, pyyaml and matplotlib.
"""
