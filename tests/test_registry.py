"""The registry and the generic config machinery every component relies on."""
from dataclasses import dataclass

import pytest

from trainables.config import Config, ConfigError, build, merge, param, parse_overrides, to_dict
from trainables.registry import Registry, UnknownNameError


def test_registry_lookup_duplicates_and_unknown_names():
    reg = Registry("widget")

    @reg.register("a")
    class A:
        pass

    @reg.register()
    def b():
        return 1

    assert reg.get("a") is A and A.name == "a"
    assert reg.get("b") is b and reg.names() == ["a", "b"] and "a" in reg and len(reg) == 2
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(type("A2", (), {}))
    with pytest.raises(UnknownNameError, match=r"unknown widget 'c'; known: a, b"):
        reg.get("c")


def test_subclass_does_not_inherit_registered_name():
    reg = Registry("widget")

    @reg.register("base")
    class Base:
        pass

    @reg.register()
    class Child(Base):
        pass

    assert reg.names() == ["Child", "base"] and Child.name == "Child" and Base.name == "base"


PARTS = Registry("part")


@dataclass
class PartConfig(Config):
    name: str = param("gear", "registered part", registry=PARTS)
    size: float = param(1.0, "size in mm", low=0.0, low_open=True)


@dataclass
class GearConfig(PartConfig):
    teeth: int = param(12, "number of teeth", low=3)


@PARTS.register("gear")
class Gear:
    Config = GearConfig


@PARTS.register("spring")
class Spring:
    Config = PartConfig


@dataclass
class MachineConfig(Config):
    part: PartConfig = param(factory=PartConfig, help="the part", registry=PARTS)
    spare: PartConfig | None = param(None, "optional spare", registry=PARTS)
    speeds: list[float] = param([1.0], "speeds in rpm")
    mode: str = param("fast", "mode", choices=("fast", "slow"))

    def check(self, path):
        if self.mode == "slow" and max(self.speeds) > 10:
            raise ConfigError(f"speeds: {self.speeds} too fast for mode 'slow'")


def test_build_picks_the_implementation_config_by_name():
    cfg = build(MachineConfig, {"part": {"teeth": 20}})
    assert isinstance(cfg.part, GearConfig) and cfg.part.teeth == 20 and cfg.spare is None
    cfg = build(MachineConfig, {"part": {"name": "spring", "size": 2}, "spare": {"name": "gear"}})
    assert type(cfg.part) is PartConfig and cfg.part.size == 2.0 and isinstance(cfg.spare, GearConfig)
    assert build(MachineConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize("data, message", [
    ({"part": {"name": "spring", "teeth": 3}}, r"part\.teeth: unknown key; allowed keys: name, size"),
    ({"part": {"name": "bolt"}}, r"part\.name: unknown part 'bolt'; known: gear, spring"),
    ({"part": {"size": 0}}, r"part\.size: 0\.0 is out of range; allowed: in \(0\.0, inf\)"),
    ({"part": {"teeth": 2.5}}, r"part\.teeth: expected an integer, got 2\.5"),
    ({"mode": "medium"}, r"mode: 'medium' is not allowed; allowed: one of 'fast', 'slow'"),
    ({"speeds": "fast"}, r"speeds: expected a list"),
    ({"speeds": [1, "x"]}, r"speeds\[1\]: expected a number"),
    ({"mode": "slow", "speeds": [20]}, r"too fast"),
    ({"colour": 1}, r"colour: unknown key"),
])
def test_errors_name_the_field_the_value_and_what_is_allowed(data, message):
    with pytest.raises(ConfigError, match=message):
        build(MachineConfig, data)


def test_merge_layers_and_replaces_a_section_whose_name_changes():
    base = {"part": {"name": "gear", "teeth": 30}, "mode": "fast"}
    assert merge(base, {"part": {"size": 3}}) == {"part": {"name": "gear", "teeth": 30, "size": 3}, "mode": "fast"}
    assert merge(base, {"part": {"name": "spring"}})["part"] == {"name": "spring"}
    assert base["part"] == {"name": "gear", "teeth": 30}  # inputs untouched


def test_parse_overrides():
    assert parse_overrides(["a.b=3", "a.c=[1, 2]", "d=x", "a.b=4"]) == {"a": {"b": 4, "c": [1, 2]}, "d": "x"}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["novalue"])
