"""fastcell.evaluate: embeddings per cell, and how well they separate mechanisms of action.

    embed.py        `fastcell embed`: checkpoint + shards -> embeddings.npy + cells.parquet (chunked, resumable)
    profiles.py     cells or a profile table -> wells (mean) joined to the design -> treatments (median)
    postprocess.py  zscore, whitening and TVN fitted on DMSO wells
    neighbours.py   cosine k-NN through FAISS (CPU or GPU) with excluded references and documented ties
    handcrafted.py  hand-crafted per-cell features: the classical baseline, scored the same way
    metrics.py      NSC, NSCB, drop, per-MoA accuracy; the cell-level k-NN vote; retrieval mAP (copairs)
    report.py       report.json, report.md, CSVs and plots; how figures are shown (figure) and read back
    compare.py      `fastcell compare`: several reports side by side
    pipeline.py     `fastcell eval` as one call: EvalConfig -> run_eval
    cli.py          the Typer verbs embed, eval and compare
"""
