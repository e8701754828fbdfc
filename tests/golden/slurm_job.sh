#!/bin/sh
#SBATCH --job-name=hsm-1a2b3c4d5e
#SBATCH --output=/home/u/.hsm/slurm/ab12/jobs/7-1/slurm.out
#SBATCH --open-mode=append
#SBATCH --no-requeue
#SBATCH --partition=gpu
#SBATCH --time=30
#SBATCH --cpus-per-task=4
#SBATCH --gpus=1
#SBATCH --constraint=a100
# The job travels as data: its config and settings are in the files below.
export PYTHONPATH=/home/u/.hsm/agent/3f2a${PYTHONPATH:+:$PYTHONPATH}
exec /opt/conda/envs/ml/bin/python -m hsm_core.batch_job /home/u/.hsm/slurm/ab12/jobs/7-1 /home/u/.hsm/slurm/ab12/sessions/9c1e
