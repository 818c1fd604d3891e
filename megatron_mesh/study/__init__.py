"""The recursive-vs-vanilla study as one command (tools/study.py): plan, train, report.

``plan`` turns a study YAML into runs (variant x seed), ``runner`` trains them resumably with
tools/pretrain_mesh.py under torchrun, ``report`` writes the loss curves (Fig. 6, left), a
Table-1-shaped table and the probes (Figs. 3-5).
"""
