"""Benchmarks of mst_compile: memory and time of one training (or inference) step of a
Llama-shaped proxy, one mode per fresh process; how we measure: benchmarks/README.md.

    python -m benchmarks                  # S=16384, every available mode
    python -m benchmarks --quick          # S=4096, 1 measured step: a smoke run
    python -m benchmarks --chunk-sweep    # also mst with chunks 4, 8, 16, 32

Files, one concern each:
    workload.py   the model, its inputs and seeds (the same for every mode)
    modes.py      how each mode builds its forward function
    reference.py  a hand-written mini-sequence model in the style of the MST reference code
    measure.py    one mode in one process: warm-up, then measured steps (time, VmHWM)
    runner.py     the parent side: one fresh subprocess per (mode, sequence length)
    report.py     results.json, results.md, the PNG plot, the loss check and the targets
    __main__.py   the command line
"""
