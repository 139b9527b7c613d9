"""A `.pt2` file is checked before PyTorch reads it: `torch.export.load` runs code that the file can name.

`torch.export.load` unpickles (weights_only=False) a weight or constant whose entry is marked as pickled, a legacy
weights file, opaque constants and, where a safe load fails, the sample inputs; it loads the shared libraries of an
AOTInductor package; it evaluates every symbolic size of the graph with `sympy.sympify` (Python's eval); and the
graph calls whatever `torch.<path>` its nodes name. `check_pt2_archive` refuses all of that, so that what PyTorch
then reads is raw tensor bytes, json and the graph of `maskrcnn export`: aten / torchvision operators, Python's
arithmetic and sympy size expressions.
"""

from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from pathlib import Path

import torch
from torch.export.pt2_archive import constants as pt2

# the archive's folders PyTorch reads for an ExportedProgram (relative to the archive's root folder)
_READ_FOLDERS = (pt2.MODELS_DIR, pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR, pt2.SAMPLE_INPUTS_DIR, pt2.EXTRA_DIR, ".data/")
# the callables the graph's nodes may name besides aten / torchvision operators
_OPERATORS = {f"_operator.{name}" for name in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne", "lt", "le", "gt",
    "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift", "getitem", "truth")}
_OPERATOR_PATHS = re.compile(r"torch\.ops\.(aten|torchvision)\.(__i?(and|or|xor|lshift|rshift)__|[a-z][a-z0-9_]*|_[a-z]"
                             r"[a-z0-9_]*)\.[A-Za-z][A-Za-z0-9_]*|math\.[a-z][a-z0-9_]*|torch\.sym_[a-z_]+")
# the sympy and torch.utils._sympy classes a size expression is built of
_SIZE_FUNCTIONS = {
    "Add", "Mul", "Pow", "Integer", "Float", "Rational", "Symbol", "Max", "Min", "Abs", "Equality", "Unequality",
    "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
    "Identity", "OpaqueUnaryFn_sqrt", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or"}
_SYMBOL_NAME = re.compile(r"[a-z]{1,8}\d+")


def check_pt2_archive(path: Path) -> None:
    """Raises ValueError (one line naming `path` and the entry) unless the .pt2 file can be read without running
    anything it holds: a zip of the current archive version, no AOTInductor or other compiled package, no pickled
    weight or constant, sample inputs that load with weights_only=True, graph nodes that call operators only and
    size expressions that are sympy arithmetic only."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{path}: not a loadable ExportedProgram (not a complete .pt2 archive: {error})") from None
    with archive:
        names = archive.namelist()
        root = names[0].split("/", 1)[0] + "/" if names else ""
        entries = {name[len(root):]: name for name in names if name.startswith(root)}
        if len(entries) != len(names) or entries.get(pt2.ARCHIVE_VERSION_PATH) is None:
            raise ValueError(f"{path}: not a loadable ExportedProgram (no {pt2.ARCHIVE_VERSION_PATH} in one root "
                             f"folder; an older or foreign archive)")
        try:
            for entry, name in entries.items():
                _check_entry(archive, entry, name)
        except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a loadable ExportedProgram (unreadable entry: {error})") from None
        except _Refused as refusal:
            raise ValueError(f"{path}: refused, {refusal}; a file `maskrcnn export` writes has none") from None


class _Refused(Exception):
    """What in the archive would run code when PyTorch reads it."""


def _check_entry(archive: zipfile.ZipFile, entry: str, name: str) -> None:
    """Raises _Refused for an archive entry PyTorch would run code of (its name relative to the root folder)."""
    if "/" not in entry:  # archive_format, archive_version, byteorder: read as text
        return
    if not entry.startswith(_READ_FOLDERS):
        raise _Refused(f"{entry}: not part of an ExportedProgram (compiled code or a foreign package)")
    if entry.startswith((pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR)):
        file_name = entry.rsplit("/", 1)[1]
        if file_name.endswith(".json"):
            _check_payload_config(json.loads(archive.read(name)), entry)
        elif not re.fullmatch(rf"({pt2.WEIGHT_FILENAME_PREFIX}|{pt2.TENSOR_CONSTANT_FILENAME_PREFIX})\d+", file_name):
            raise _Refused(f"{entry}: a pickled or legacy weights file")
    elif entry.startswith(pt2.SAMPLE_INPUTS_DIR):
        try:
            torch.load(io.BytesIO(archive.read(name)), weights_only=True)
        except Exception:  # noqa: BLE001 (any refusal of the safe unpickler: torch would retry it unsafely)
            raise _Refused(f"{entry}: sample inputs that only load by unpickling code") from None
    elif entry.startswith(pt2.MODELS_DIR):
        _check_graph(json.loads(archive.read(name)), entry)


def _check_payload_config(config: dict, entry: str) -> None:
    """A weights / constants config: every entry raw tensor bytes (no pickle, no custom or opaque object)."""
    for key, meta in config.get("config", {}).items():
        raw_tensor = re.fullmatch(rf"({pt2.WEIGHT_FILENAME_PREFIX}|{pt2.TENSOR_CONSTANT_FILENAME_PREFIX})\d+",
                                  str(meta.get("path_name")))
        if meta.get("use_pickle", True) or raw_tensor is None:
            raise _Refused(f"{entry}: {key!r} is stored as a pickle or an object")


def _check_graph(value, entry: str) -> None:
    """Walks a serialized ExportedProgram: node targets must be operators, size expressions sympy arithmetic."""
    stack, expressions = [value], set()  # the same size expressions recur at many nodes: each is parsed once
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, child in item.items():
                if key in ("target", "as_operator") and isinstance(child, str) and not _operator_allowed(child):
                    raise _Refused(f"{entry}: the graph calls {child[:80]!r}, not an operator")
                if key == "as_custom_obj":
                    raise _Refused(f"{entry}: the graph holds a custom object")
                if key == "expr_str" and not (isinstance(child, str) and child in expressions):
                    if not _size_expression_allowed(child):
                        raise _Refused(f"{entry}: size expression {str(child)[:80]!r} is not sympy arithmetic")
                    expressions.add(child)
                stack.append(child)


def _operator_allowed(target: str) -> bool:
    """An aten / torchvision operator overload, a function of `math`, torch's sym_* or one of _OPERATORS (no path
    through attributes such as __class__ or __globals__ to anything else)."""
    return target in _OPERATORS or _OPERATOR_PATHS.fullmatch(target) is not None


def _size_expression_allowed(text) -> bool:
    """Whether `text` is calls of _SIZE_FUNCTIONS on numbers, booleans and Symbol('s0', integer=True, ...)."""
    if not isinstance(text, str):
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _SIZE_FUNCTIONS):
                return False
            strings = [arg for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
            if strings and not (node.func.id == "Symbol" and len(node.args) == 1 and
                                _SYMBOL_NAME.fullmatch(strings[0].value)):
                return False
            if any(not isinstance(k.value, ast.Constant) or not isinstance(k.value.value, bool) for k in node.keywords):
                return False
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float, str)):
                return False
        elif isinstance(node, ast.Name):
            if node.id not in _SIZE_FUNCTIONS and node.id not in ("True", "False"):
                return False
        elif not isinstance(node, (ast.Expression, ast.keyword, ast.Load, ast.UnaryOp, ast.USub, ast.BinOp,
                                   ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)):
            return False
    return True
