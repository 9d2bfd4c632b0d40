"""Named runs of the report, as TOML files inside the package.

A preset holds a `[config]` table (settings that differ from its study's defaults) and says
which table entry of the report it reproduces and the seed's number for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from cifarlab import CifarlabError
from cifarlab.config import STUDIES, Config, read_toml


# The run whose layers the report's section 1.4 analyses (t-SNE, one-vs-rest).
REFERENCE_RUN = "classifier-b128"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    reproduces: str
    seed_metric: str            # "test_accuracy" or "ovr_embedding"
    seed_value: float | None    # the report's number, None where it gives none
    settings: dict[str, Any]

    @property
    def study(self) -> str:
        return self.settings["study"]

    def config(self, **overrides: Any) -> Config:
        """Study defaults, then the preset's settings, then `overrides` (e.g. command-line flags)."""
        settings = {k: v for k, v in self.settings.items() if k != "study"}
        return Config.for_study(self.study, **{**settings, **overrides})


def _preset_files() -> dict[str, Path]:
    folder = resources.files("cifarlab") / "presets"
    return {Path(f.name).stem: Path(str(f)) for f in folder.iterdir() if f.name.endswith(".toml")}


def load_preset(name: str) -> Preset:
    files = _preset_files()
    if name not in files:
        raise CifarlabError(f"unknown preset {name!r}; `cifarlab presets` lists them: {', '.join(sorted(files))}")
    raw = read_toml(files[name])
    try:
        settings = dict(raw["config"])
        study = settings.get("study")  # checked over its study's defaults (a Siamese run's holdout), as it is run
        defaults = Config.for_study(study).to_dict() if study in STUDIES else {}
        Config.from_dict({**defaults, **settings}, source=f"preset {name}")
        return Preset(name=name, description=raw["description"], reproduces=raw["reproduces"],
                      seed_metric=raw["seed_metric"], seed_value=raw.get("seed_value"), settings=settings)
    except KeyError as err:
        raise CifarlabError(f"preset {name} ({files[name]}) lacks {err}") from None


def all_presets() -> list[Preset]:
    return [load_preset(name) for name in sorted(_preset_files())]
