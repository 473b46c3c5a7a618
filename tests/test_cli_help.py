"""`bbf --help`, every subcommand's and `bbf-inspect --help` answer without importing torch (parsing the arguments
imports nothing heavy), every option's help states its default, and `import bbformat` is lazy but complete.

These are structural checks (what a fresh interpreter has imported), not timings."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from bbformat.cli import inspect as inspect_cli
from bbformat.cli import main as bbf_main

# parses argv with the real parser (which exits after printing the help), then reports what got imported
PARSE = """
import sys
from bbformat.cli.{module} import build_parser
try:
    build_parser().parse_args(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("torch" in sys.modules, "bbformat.codecs" in sys.modules, "bbformat.container.reader" in sys.modules, code)
"""


def subcommands() -> list[str]:
    sub = next(a for a in bbf_main.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


HELPS = [("main", "bbf", []), *(("main", f"bbf {c}", [c]) for c in subcommands()), ("inspect", "bbf-inspect", [])]


@pytest.mark.parametrize("module,prog,argv", HELPS, ids=[h[1] for h in HELPS])
def test_help_prints_usage_without_importing_torch(module, prog, argv):
    p = subprocess.run([sys.executable, "-c", PARSE.format(module=module), *argv, "--help"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    *usage, last = p.stdout.rstrip("\n").split("\n")
    assert usage[0].startswith(f"usage: {prog}"), p.stdout[:200]
    assert "-h, --help" in p.stdout
    assert last == "False False False 0", f"after `{prog} --help`: torch, codecs, reader imported, exit = {last}"


def test_import_bbformat_is_lazy_and_complete():
    script = """
import sys
import bbformat
heavy = [m for m in ("torch", "numpy", "transformers", "bbformat.container.reader") if m in sys.modules]
assert not heavy, heavy
from bbformat import (BBFError, BBFReader, BBFWriter, FetchOptions, FormatError, ModelDesc, load, load_model,
                      load_pretrained, loads, open as bbf_open, save)
assert bbformat.open is bbf_open and bbformat.load is load and bbformat.FetchOptions is FetchOptions
assert bbformat.codecs.get_codec("raw").id == "raw"   # subpackages resolve on attribute access too
assert {"SlicedForCausalLM", "SlicedConfig", "save", "codecs"} <= set(dir(bbformat))
try:
    bbformat.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
else:
    raise AssertionError("no AttributeError")
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_public_names_resolve():
    import bbformat

    for name in bbformat.__all__:  # not SlicedForCausalLM/SlicedConfig (transformers): tests/test_generate.py
        assert getattr(bbformat, name) is not None, name
    from bbformat.container.reader import BBFReader, open as reader_open
    from bbformat.container.writer import save

    assert bbformat.BBFReader is BBFReader and bbformat.open is reader_open and bbformat.save is save


def _options(parser: argparse.ArgumentParser, prog: str):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _options(sub, f"{prog} {name}")
        elif a.option_strings and not isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            yield prog, a


def test_every_option_states_its_default():
    opts = [*_options(bbf_main.build_parser(), "bbf"), *_options(inspect_cli.build_parser(), "bbf-inspect")]
    assert len(opts) > 50
    for prog, a in opts:
        text = a.help or ""
        want = "(required)" if a.required else "default"
        assert want in text, f"{prog} {a.option_strings[0]}: {text!r}"


def test_parser_choices_match_the_registries():
    from bbformat.cli.common import CODEC_IDS, WORD_DTYPE_NAMES
    from bbformat.codecs import codec_ids
    from bbformat.words import WORD_DTYPES

    assert list(CODEC_IDS) == codec_ids()
    assert list(WORD_DTYPE_NAMES) == list(WORD_DTYPES)
