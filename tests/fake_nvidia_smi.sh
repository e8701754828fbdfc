#!/bin/sh
# A fake nvidia-smi for the GPU tests: reports the GPUs listed in $HSM_FAKE_GPUS, one per
# line as "index, uuid, memory used MiB, memory total MiB", for the two queries hsm makes.
case "$1" in
    --query-gpu=index,uuid,*) cat "$HSM_FAKE_GPUS" ;;
    *) awk -F', ' '{ print $1 ", Fake GPU, 0, " $3 ", " $4 }' "$HSM_FAKE_GPUS" ;;
esac
