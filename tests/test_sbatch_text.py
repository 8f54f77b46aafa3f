"""The sbatch scripts users' jobs run, rendered from ``hydra.launcher`` options, pinned against
reference files (tests/data/sbatch/*.sbatch) as submitit pins its own: GPU request spellings,
containers (a ``python`` command, ``srun_args``, ``use_srun``), setup lines.

Set ``MNIST_HPC_UPDATE_SBATCH=1`` to rewrite the references after a deliberate change, and
read the diff before committing it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

REFERENCES = REPO / "tests" / "data" / "sbatch"
CASES = {
    "default": [],
    "gpus_per_node": ["hydra.launcher.gpus_per_node=2"],
    "gres": ["hydra.launcher.gpus_per_node=2", "hydra.launcher.gpu_request=gres"],
    "gpus_per_task": ["hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4",
                      "hydra.launcher.gpu_request=gpus_per_task"],
    "apptainer": ["hydra.launcher.python='apptainer exec --nv --bind /scratch,/home /scratch/img/mnist-hpc.sif python3'",
                  "hydra.launcher.setup=[module load apptainer]"],
    "pyxis": ["hydra.launcher.srun_args=['--container-image=/scratch/img/mnist-hpc.sqsh','--container-mounts=/scratch']"],
    "no_srun": ["hydra.launcher.use_srun=false", "hydra.launcher.partition=cpu", "hydra.launcher.account=proj42"],
    "multi_worker": ["hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=4"],
    # New sbatch keys without '+' (issue 23): the mapping is open, any sbatch option goes in.
    "additional": ["hydra.launcher.additional_parameters={hold: true, mail-type: END}"],
}


def render(overrides: list[str]) -> str:
    """The sbatch text submitit would write for one job with these launcher options."""
    import submitit
    from hydra import compose, initialize_config_dir

    from hydra_plugins.mnist_hpc_launcher.launcher import register_plugins
    from mnist_hpc.config import conf_dir, register_configs
    from mnist_hpc.login.launcher.options import executor_init, submitit_parameters, typed

    register_configs()
    register_plugins()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    conf = typed(cfg.hydra.launcher, "slurm", Path("/scratch/u/sweep"))
    folder = "/scratch/u/sweep/.submitit/%j"
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", **executor_init(conf, "slurm"))
    executor.update_parameters(**submitit_parameters(conf, "slurm"))
    inner = executor._executor
    text = inner._make_submission_file_text(inner._submitit_command_str, "uid")
    return text.replace(str(Path(sys.executable)), "PYTHON").replace(sys.executable, "PYTHON")


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_sbatch_matches_its_reference(case: str) -> None:
    text = render(CASES[case])
    reference = REFERENCES / f"{case}.sbatch"
    if os.environ.get("MNIST_HPC_UPDATE_SBATCH") == "1":
        reference.parent.mkdir(parents=True, exist_ok=True)
        reference.write_text(text)
    assert text == reference.read_text()


def test_each_gpu_spelling_asks_for_the_gpus_once() -> None:
    lines = {case: [ln for ln in render(CASES[case]).splitlines() if ln.startswith("#SBATCH") and "gpu" in ln] for case in CASES}
    assert lines["default"] == []
    assert lines["gpus_per_node"] == ["#SBATCH --gpus-per-node=2"]
    assert lines["gres"] == ["#SBATCH --gres=gpu:2"]
    assert lines["gpus_per_task"] == ["#SBATCH --gpus-per-task=1"]


@pytest.mark.parametrize("spellings", [
    ["hydra.launcher.additional_parameters={hold: true, mail-type: END}",
     "+hydra.launcher.additional_parameters={hold: true, mail-type: END}"],
    ["hydra.launcher.additional_parameters.hold=true", "+hydra.launcher.additional_parameters.hold=true"],
])
def test_new_sbatch_keys_with_or_without_plus_render_the_same_text(spellings: list[str]) -> None:
    without, plus = (render([s]) for s in spellings)
    assert without == plus
    assert "#SBATCH --hold\n" in without and "#SBATCH --hold\n" not in render([])


def test_a_misspelt_launcher_option_is_still_refused() -> None:
    """Only additional_parameters is open: a new key beside the options is still Hydra's error."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="hydra.launcher.cpus_per_tsk"):
        render(["hydra.launcher.cpus_per_tsk=2"])
