"""One flat configuration of plain values for every study, saved as `config.toml` in a run."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cifarlab import CifarlabError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STUDIES = ("classifier", "siamese", "transfer")
# The settings that only some studies read; every other setting applies to all three.
READ_BY = {
    "weight_decay": ("classifier", "transfer"),
    **{key: ("siamese",) for key in ("loss", "margin", "sampler", "fraction_same", "val_tuples")},
    **{key: ("transfer",) for key in ("backbone", "backbone_weights", "refine_after", "input_size", "feature_cache")},
}
def study_reads(study: str, key: str) -> bool:
    """Whether runs of `study` read setting `key` (a classifier run has no margin)."""
    return study in READ_BY.get(key, STUDIES)


# Settings that say where and how a run runs, not what it is: a resumed run runs under the
# resuming call's. With `steps` and `distributed`, they may differ without making it another run.
WHERE_AND_HOW = ("data", "device", "tensorboard", "cuda_graph", "compile")
NOT_IDENTITY = frozenset({"steps", "distributed", *WHERE_AND_HOW})
# Settings that say where or how a run ran, not what it trained: left out when runs are compared.
NOT_COMPARED = frozenset({"distributed", "memory_format", "feature_cache", *WHERE_AND_HOW})
# Where a study's defaults differ from the classifier's (the report's step counts).
STUDY_DEFAULTS = {"siamese": {"steps": 50000, "val_fraction": 0.2}, "transfer": {"steps": 10000}}


def backbone_input_size_ok(size) -> bool:
    """Both backbones downsample by 32: their input is 32, 64, ..., 224 pixels a side."""
    return isinstance(size, int) and size >= 32 and size % 32 == 0


def same_class_pairs(fraction_same: float, batch_size: int) -> int:
    """floor(f * B), the report's count of same-class pairs in a batch: with a little slack, since
    0.29 * 100 is 28.999999999999996 in floating point."""
    return math.floor(fraction_same * batch_size + 1e-9)


def baseline_accuracy(study: str, fraction_same: float, batch_size: int) -> tuple[float, str]:
    """The test accuracy of a rule that never looks at the images, and the rule: what a run's
    accuracy must beat. A classifier's is a guess among CIFAR-10's ten classes; a Siamese run's is
    the majority answer on its evaluation pairs, as many same-class in each as in a training batch
    (0.80 for "always 'different'" at the report's 20%)."""
    if study != "siamese":
        return 0.1, "chance"
    same = same_class_pairs(fraction_same, batch_size)
    answer = "different" if same <= batch_size - same else "same"
    return max(same, batch_size - same) / batch_size, f"always '{answer}'"


@dataclass
class Config:
    """Everything a run needs. Study-specific fields are ignored by the other studies."""

    study: str = "classifier"
    # optimisation (the seed's recipe)
    steps: int = 15000
    batch_size: int = 128
    lr: float = 1e-4
    seed: int = 42
    # evaluation and saving
    eval_every: int = 1000
    checkpoint_every: int = 5000
    # model (study 1)
    dropout: float = 0.0
    weight_decay: float = 0.0
    init: str = "normal"
    val_fraction: float = 0.0  # hold out the last fraction of train as a validation split
    # Siamese (study 2)
    loss: str = "report1"
    margin: float = 1.0
    sampler: str = "anchor"
    fraction_same: float = 0.2
    val_tuples: int = 500
    # transfer (study 3)
    backbone: str = "vgg16"
    backbone_weights: str = "imagenet"  # "imagenet", "none" or a weights file
    refine_after: int = -1  # K: train the backbone too from step K on; -1 = never (feature extraction)
    input_size: int = 32
    feature_cache: bool = True  # while the backbone is frozen, compute its features once
    # where and how
    data: str = ""
    device: str = "auto"
    precision: str = "fp32"
    memory_format: str = "auto"
    cuda_graph: bool = True
    compile: bool = False  # torch.compile the training step's loss (off: slower on a CPU, measured)
    tensorboard: bool = True
    distributed: bool = False  # one of several torchrun processes (DDP); recorded, but a resume sets it anew

    def validate(self) -> "Config":
        settings = {f.name for f in fields(self)}

        def need(ok: bool, what: str) -> None:
            if not ok:  # a setting is named as in config.toml and as the flag that sets it
                name = what.split(" ", 1)[0]
                if name in settings and name != "study":
                    what = f"{name} (--{name.replace('_', '-')}){what[len(name):]}"
                raise CifarlabError(f"invalid config: {what}")

        need(self.study in STUDIES, f"study {self.study!r} is not one of {', '.join(STUDIES)}")
        need(self.steps >= 1, f"steps must be >= 1 (got {self.steps})")
        need(self.batch_size >= 1, f"batch_size must be >= 1 (got {self.batch_size})")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0 (got {self.lr})")
        need(0 <= self.seed < 2**32, f"seed must be in [0, 2**32) (got {self.seed})")
        need(self.eval_every >= 1, f"eval_every must be >= 1 (got {self.eval_every})")
        need(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1 (got {self.checkpoint_every})")
        need(0.0 <= self.dropout < 1.0, f"dropout is a drop probability in [0, 1) (got {self.dropout})")
        need(0.0 <= self.weight_decay < math.inf, f"weight_decay must be >= 0 and finite (got {self.weight_decay})")
        need(0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1) (got {self.val_fraction})")
        need(self.init in ("normal", "xavier"), f"init must be normal or xavier (got {self.init!r})")
        need(self.loss in ("report1", "report2", "hadsell"),
             f"loss must be report1, report2 or hadsell (got {self.loss!r})")
        need(0 < self.margin < math.inf, f"margin must be > 0 and finite (got {self.margin})")
        need(self.sampler in ("anchor", "random"), f"sampler must be anchor or random (got {self.sampler!r})")
        need(0.0 < self.fraction_same < 1.0, f"fraction_same must be in (0, 1) (got {self.fraction_same})")
        need(self.val_tuples >= 1, f"val_tuples must be >= 1 (got {self.val_tuples})")
        need(self.backbone in ("vgg16", "efficientnet-lite0"),
             f"backbone must be vgg16 or efficientnet-lite0 (got {self.backbone!r})")
        need(self.refine_after >= -1, f"refine_after must be a step >= 0, or -1 for never (got {self.refine_after})")
        need(is_device_name(self.device), f"device must be auto, cpu, cuda or cuda:N (got {self.device!r})")
        need(self.precision in ("fp32", "bf16"), f"precision must be fp32 or bf16 (got {self.precision!r})")
        need(self.memory_format in ("auto", "channels_last", "contiguous"),
             f"memory_format must be auto, channels_last or contiguous (got {self.memory_format!r})")
        need(not (self.compile and self.distributed),
             "--compile is not supported with --distributed training; drop one")
        for f in fields(self):
            value = getattr(self, f.name)
            # a path of bytes in another encoding (Python keeps them as lone surrogates): config.toml is UTF-8
            need(not isinstance(value, str) or _is_utf8(value),
                 f"{f.name} {value!r} is not valid UTF-8 (bytes of another encoding); "
                 "rename it, or use a link with a UTF-8 name")
        if self.study == "siamese":
            need(self.val_fraction > 0, f"val_fraction must be > 0 for the Siamese study: its validation tuples "
                                        f"come from the held-out end of train (the report holds out 0.2; got {self.val_fraction})")
            same = same_class_pairs(self.fraction_same, self.batch_size)
            need(same >= 1, f"fraction_same {self.fraction_same} of batch_size {self.batch_size} gives no "
                            "same-class pair per batch; use a larger --batch-size or --fraction-same")
        if self.study == "transfer":
            need(backbone_input_size_ok(self.input_size),
                 f"input_size must be a multiple of 32 (32, 64, ..., 224) for a backbone, which downsamples by 32 "
                 f"(got {self.input_size})")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def study_settings(self) -> dict[str, Any]:
        """The settings its study reads (a classifier run has no margin): what config.toml shows.
        Reading it back fills the others with their defaults."""
        return {key: value for key, value in self.to_dict().items() if study_reads(self.study, key)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "Config":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise CifarlabError(f"{source}: unknown {'setting' if len(unknown) == 1 else 'settings'} {', '.join(unknown)}")
        typed = {}
        for name, value in values.items():
            kind = type(getattr(cls(), name))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise CifarlabError(
                    f"{source}: {name} should be {kind.__name__}, got {value!r}"
                )
            typed[name] = value
        try:
            return cls(**typed).validate()
        except CifarlabError as err:
            if source == "config":
                raise
            raise CifarlabError(f"{source}: {err}") from None

    @classmethod
    def for_study(cls, study: str, **changes: Any) -> "Config":
        """The defaults of `study` (e.g. 50,000 steps for the Siamese study), then `changes`."""
        if study not in STUDIES:
            raise CifarlabError(f"unknown study {study!r}; choose one of {', '.join(STUDIES)}")
        return cls(study=study, **STUDY_DEFAULTS.get(study, {})).replace(**changes)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes).validate()


def is_device_name(name: str) -> bool:
    """auto, cpu, cuda or cuda:N (engine.resolve_device turns it into a device)."""
    return name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # JSON's string escapes are TOML's (\n, \t, \uXXXX...): a path with a newline stays readable
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")  # DEL: JSON keeps it raw


def to_toml(values: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    """Flat TOML: the run's settings, then an [about] table (version, commit...)."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    if header:
        lines += ["", "[about]"] + [f"{key} = {_toml_value(v)}" for key, v in header.items()]
    return "\n".join(lines) + "\n"


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise CifarlabError(f"{path}: not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise CifarlabError(f"{path}: not valid TOML ({err}); fix or remove the file") from None


def identity_differences(a: Config, b: Config) -> list[str]:
    """The settings in which two configs are different runs (not where or how they run, nor how long,
    nor what neither's study reads: a classifier run's margin)."""
    return [f.name for f in fields(Config) if f.name not in NOT_IDENTITY and getattr(a, f.name) != getattr(b, f.name)
            and (study_reads(a.study, f.name) or study_reads(b.study, f.name))]


def embeds_anchor_once(cfg: Config) -> bool:
    """Whether a Siamese step embeds its anchor once (studies.SiameseTask.embed_pairs): anchor
    batches without dropout."""
    return cfg.study == "siamese" and cfg.sampler == "anchor" and cfg.dropout == 0


def images_per_step(cfg: Config) -> int:
    """Images one training step of a ConvNet or Siamese run sends through the network."""
    if cfg.study != "siamese":
        return cfg.batch_size
    return cfg.batch_size + 1 if embeds_anchor_once(cfg) else 2 * cfg.batch_size


TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _setting_value(key: str, text: str) -> Any:
    """The text of `--set KEY=TEXT` as KEY's type: `lr=.001`, `seed=042` and `cuda_graph=True`
    mean what they say (TOML would refuse all three); a string may be quoted or not."""
    kind = type(getattr(Config(), key, ""))
    if kind is bool:
        word = text.lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise CifarlabError(f"--set: {key} is true or false (also yes/no, on/off, 1/0), got {text!r}")
    if kind in (int, float):
        try:
            value = kind(text.replace("_", "")) if kind is int else float(text)
        except ValueError:
            raise CifarlabError(f"--set: {key} should be {'a whole number' if kind is int else 'a number'}, "
                                f"got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise CifarlabError(f"--set: {key} should be a finite number, got {text!r}")
        return value
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def parse_settings(items: list[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` pairs as Config settings, each read as its setting's type, checked."""
    values: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise CifarlabError(f"--set takes KEY=VALUE (e.g. batch_size=64), got {item!r}")
        values[key] = text.strip()
    if "study" in values:
        raise CifarlabError("--set cannot change a run's study; choose studies with --only")
    if "distributed" in values:
        raise CifarlabError("--set cannot make runs distributed: start one run with torchrun ... --distributed")
    known = {f.name for f in fields(Config)}
    values = {key: _setting_value(key, text) if key in known else text for key, text in values.items()}
    Config.from_dict({**Config().to_dict(), **values}, source="--set")
    return values


def load_config(path: Path) -> Config:
    values = read_toml(path)
    values.pop("about", None)
    if not values:  # the empty file a new run claims its folder with, left by a start that failed
        raise CifarlabError(f"{path}: holds no settings (the run never got past its start); "
                            f"delete {path.parent} and train it anew")
    if "study" not in values:
        raise CifarlabError(f"{path}: names no study; put back its `study = ...` line (classifier, siamese or "
                            "transfer)")
    return Config.from_dict(values, source=str(path))
