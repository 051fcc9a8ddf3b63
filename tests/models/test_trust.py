"""The trust policy (els_audit.models.trust): one function for every code reference."""

import sys
import textwrap

import pytest
import torch.nn as nn

from els_audit.models import ModelLoadError
from els_audit.models.trust import (REGISTERED_ARCHITECTURES, USER_ORIGIN, call_architecture, check_plain_data,
                                    resolve_architecture)
from els_audit.models.zoo import PaperResNet
from els_audit.registry import PluginError


@pytest.fixture
def userfile(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text(textwrap.dedent("""
        import os
        import torch.nn as nn
        from os import system as reexported

        class Net(nn.Module):
            def __init__(self, width=2):
                super().__init__()
                self.c = nn.Conv2d(1, width, 1)

        def net(width=2):
            return Net(width)

        NOT_CALLABLE = 3
    """))
    return f


def test_registered_architectures_resolve_by_name_and_by_value_from_any_origin():
    by_name = resolve_architecture("PaperResNet", origin="sidecar", where="s.toml")
    by_value = resolve_architecture("els_audit.models.zoo.architectures:PaperResNet", origin="zoo config",
                                    where="config.json")
    assert by_name.build is PaperResNet and by_value.build is PaperResNet
    assert by_name.name == "els_audit.models.zoo.architectures:PaperResNet" and by_name.source == "sidecar"
    assert {"PaperResNet", "PaperUNet", "AttentionUNet"} <= set(REGISTERED_ARCHITECTURES.names())


def test_the_user_may_name_a_class_or_a_function_of_their_own_file(userfile):
    cls = resolve_architecture(f"{userfile}:Net", origin=USER_ORIGIN, where="--arch", kwargs={"width": 3})
    fn = resolve_architecture(f"{userfile}:net", origin=USER_ORIGIN, where="--arch")
    assert isinstance(call_architecture(cls, "--arch"), nn.Module) and call_architecture(cls, "x").c.out_channels == 3
    assert isinstance(call_architecture(fn, "--arch"), nn.Module)


@pytest.mark.parametrize("attr,kind", [("reexported", "built-in function"), ("NOT_CALLABLE", "int"),
                                       ("os", "module")])
def test_the_user_may_not_name_other_callables(userfile, attr, kind):
    with pytest.raises(ModelLoadError, match=kind):
        resolve_architecture(f"{userfile}:{attr}", origin=USER_ORIGIN, where="--arch")


@pytest.mark.parametrize("ref", ["sys:exit", "os:system", "subprocess:run", "builtins:eval", "shutil:rmtree",
                                 "runpy:run_path", "torch.hub:load", "torch:load", "pickle:load"])
def test_built_ins_and_library_functions_are_never_architectures(ref):
    with pytest.raises(ModelLoadError, match="torch.nn.Module subclass"):
        resolve_architecture(ref, origin="sidecar", where="s.toml", trust_model=True)
    with pytest.raises(ModelLoadError, match="is a (built-in )?function; an architecture must be"):   # nor the user's
        resolve_architecture(ref, origin=USER_ORIGIN, where="--arch")


def test_a_function_of_an_installed_module_is_no_factory_even_the_users(userfile, monkeypatch):
    monkeypatch.syspath_prepend(str(userfile.parent))
    monkeypatch.setenv("PYTHONPATH", str(userfile.parent))
    assert resolve_architecture("mine:Net", origin=USER_ORIGIN, where="--arch").build.__name__ == "Net"
    with pytest.raises(ModelLoadError, match="a function defined in a .py file you name"):
        resolve_architecture("mine:net", origin=USER_ORIGIN, where="--arch")
    import sys

    sys.modules.pop("mine", None)


def test_a_file_named_by_a_file_needs_trust_and_resolves_beside_it(userfile):
    with pytest.raises(ModelLoadError, match="not a registered architecture.*--trust-model"):
        resolve_architecture("mine.py:Net", origin="sidecar", where="s.toml", base_dir=userfile.parent)
    spec = resolve_architecture("mine.py:Net", origin="sidecar", where="s.toml", trust_model=True,
                                base_dir=userfile.parent)
    assert spec.build.__name__ == "Net"
    with pytest.raises(ModelLoadError, match="function"):   # a file may name module classes only
        resolve_architecture("mine.py:net", origin="sidecar", where="s.toml", trust_model=True,
                             base_dir=userfile.parent)


def test_modules_are_never_imported_from_the_current_folder(userfile, monkeypatch):
    monkeypatch.chdir(userfile.parent)
    monkeypatch.syspath_prepend("")
    monkeypatch.delitem(sys.modules, "mine", raising=False)
    with pytest.raises(ModelLoadError, match=r"cannot import architecture module 'mine'.*--arch ./mine.py:Net"):
        resolve_architecture("mine:Net", origin=USER_ORIGIN, where="--arch")
    assert "" in sys.path                                     # put back after the import
    # the same folder named explicitly in PYTHONPATH is the user's say-so
    monkeypatch.setenv("PYTHONPATH", str(userfile.parent))
    assert resolve_architecture("mine:Net", origin=USER_ORIGIN, where="--arch").build.__name__ == "Net"
    monkeypatch.delitem(sys.modules, "mine", raising=False)


def test_a_library_plugin_vouches_only_for_its_own_base_class():
    import types

    class Base(nn.Module):
        pass

    class Good(Base):
        pass

    lib = types.SimpleNamespace(__name__="lib", Good=Good, Other=nn.Conv2d, system=print)
    assert resolve_architecture("Good", origin="x config", where="c", library=(lib, Base)).build is Good
    for ref in ("Other", "system", "Missing"):
        with pytest.raises(ModelLoadError, match="is not a lib Base class"):
            resolve_architecture(ref, origin="x config", where="c", library=(lib, Base))


@pytest.mark.parametrize("bad", [{"x": object()}, {"x": [1, {"y": print}]}, {1: 2}])
def test_keyword_arguments_must_be_plain_data(bad):
    with pytest.raises(ModelLoadError, match="plain data|keys must be strings"):
        check_plain_data(bad, "--arch-kwargs")
    check_plain_data({"a": [1, 2.5, "s", None, True, {"b": []}]}, "ok")


def test_a_python_callable_from_a_python_caller_is_theirs():
    spec = resolve_architecture(lambda: nn.Conv2d(1, 1, 1), origin=USER_ORIGIN, where="arch=")
    assert isinstance(call_architecture(spec, "arch="), nn.Conv2d)
    with pytest.raises(ModelLoadError):
        resolve_architecture(PaperResNet, origin="sidecar", where="s.toml")


def test_building_turns_every_exception_into_one_line():
    def exits():
        raise SystemExit(3)

    def returns_int():
        return 3

    for fn, needle in ((exits, "stopped with SystemExit 3"), (returns_int, "returned a int")):
        spec = resolve_architecture(fn, origin=USER_ORIGIN, where="arch=")
        with pytest.raises(ModelLoadError, match=needle) as ei:
            call_architecture(spec, "m.pt")
        assert "\n" not in str(ei.value)


def test_an_architecture_plugin_that_is_not_a_module_class_is_refused_when_registered():
    with pytest.raises(PluginError, match="not a torch.nn.Module subclass"):
        REGISTERED_ARCHITECTURES.register("not-a-module")(print)
    assert "not-a-module" not in REGISTERED_ARCHITECTURES
