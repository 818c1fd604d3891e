# Sourced by scripts/slurm/*.sbatch: wait for the training step, then requeue the job when the
# run asks for it (see the comment at the top of pretrain.sbatch). Reads STATUS (the run's
# exit-status file), CANCELLED (set by the script's SIGTERM trap) and SLURM_JOB_ID.

# The run's status file says `"requeue": true` after a stop that resumes (exit_status.py).
run_asks_for_requeue() {
    [ -f "$STATUS" ] && grep -q '"requeue": true' "$STATUS"
}

wait_then_requeue() {
    local pid=$1 rc=0
    # `wait` returns early when a trapped signal arrives: wait again until the step is gone
    while :; do
        wait "$pid" && rc=0 || rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    if [ "$CANCELLED" = 0 ] && run_asks_for_requeue; then
        echo "[sbatch] the run stopped after saving and asks to resume ($STATUS): requeueing $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    if [ -f "$STATUS" ]; then
        echo "[sbatch] not requeued; the run's exit status: $(tr -d '\n' < "$STATUS")"
    fi
    exit "$rc"
}
