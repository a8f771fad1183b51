"""Cluster jobs: a run or a data-prep array as scheduler jobs that requeue themselves.

scheduler.py  the scheduler-neutral job description and the four things a scheduler must do
slurm.py      SLURM: plain sbatch scripts (why not submitit: its docstring)
cluster.py    cluster profiles, yamls/cluster/NAME.yaml
submit.py     run / data-prep plan + profile -> job specs -> scripts -> job ids
supervise.py  what a training job runs around its ranks: the restart policy and its log
jobdir.py     the job folder: jobs.json, events.jsonl, scripts and logs
"""
