"""``mnist-hpc-train --help``: usage, config groups and defaults, read from ``conf/`` without composing.

Hydra's own ``--help`` walks every registered config group (about a second and a half); a
login-node ``--help`` should answer at once. Login-node code: no Hydra composition, no TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

TRAIN_USAGE = """\
mnist-hpc-train: the Keras MNIST lesson as a Hydra app, trained offline from the verified cache.

Usage:
  mnist-hpc-train [KEY=VALUE ...]                          train in this process
  mnist-hpc-train -m hydra/launcher=slurm [KEY=VALUE ...]  queue on Slurm and return; a,b,c values
                                                           make a sweep: one job array
  mnist-hpc-train -m hydra/launcher=local [KEY=VALUE ...]  the same jobs as local background processes
  mnist-hpc-train -m hparams_search=optuna                 Optuna search on Slurm
  mnist-hpc-train --cfg job [KEY=VALUE ...]                print the composed config and exit
  mnist-hpc-train --hydra-help                             Hydra's own flags

First, on a login node: mnist-hpc-prefetch (compute nodes have no internet).
"""


def train_help(conf: Path) -> str:
    """Usage, config groups and the default config, read from ``conf/`` without composing.

    Hydra's own ``--help`` walks every registered config group (about a second and a half here);
    a login-node ``--help`` should answer at once.
    """
    import yaml

    from mnist_hpc.config import Config, flat_config

    top = yaml.safe_load((conf / "config.yaml").read_text())
    chosen: dict[str, object] = {}
    for entry in top.get("defaults", []):
        if isinstance(entry, dict):
            chosen.update({k: v for k, v in entry.items() if not k.startswith("override ")})
    lines = [TRAIN_USAGE, "Config groups (group=option; * marks the default):"]
    groups = {
        group.relative_to(conf).as_posix(): sorted(p.stem for p in group.glob("*.yaml"))
        for group in conf.rglob("*")
        if group.is_dir() and any(group.glob("*.yaml"))
    }
    # The launchers' options are dataclasses in ConfigStore, not YAML (mnist_hpc.login.launcher.options).
    groups["hydra/launcher"] = sorted({"local", "slurm", *groups.get("hydra/launcher", [])})
    # So are async_optuna's and Hydra's basic sweeper's (grid, -m's default, is chosen by conf/default_sweeper.yaml).
    groups["hydra/sweeper"] = sorted({"async_optuna", "basic", *groups.get("hydra/sweeper", [])})
    for name, options in sorted(groups.items()):
        marked = [f"{o}*" if chosen.get(name) == o else o for o in options]
        lines.append(f"  {name}: {', '.join(marked)}")
    # The values are the schema's defaults (conf/ does not restate them) with the chosen group's file on top.
    defaults = flat_config(Config())
    lines += ["", "Defaults (override any key as KEY=VALUE; what each means: docs/configuration.md):"]
    for name, option in chosen.items():
        path = conf / name / f"{option}.yaml"
        if option is None or not path.is_file() or "/" in name:
            continue
        section = {k.split(".", 1)[1]: v for k, v in defaults.items() if k.split(".", 1)[0] == name}
        section.update(yaml.safe_load(path.read_text()) or {})
        lines.append(f"{name}:")
        for leaf, value in section.items():
            text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()
            lines.append(f"  {leaf}: {text}")
    lines += ["", "Launcher options: mnist-hpc-train -m hydra/launcher=slurm --cfg hydra --package hydra.launcher"]
    return "\n".join(lines) + "\n"
