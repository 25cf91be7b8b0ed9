"""A minimal ELF reader: what a shared library imports and where it looks.

Theory of operation: skulk.engine.accel must know, before ``import mlx.core``,
whether libmlx.so takes ``cblas_sgemm`` from another library at run time (then
a shim in the global symbol scope can stand in for it) or carries its own copy
(then preloading cannot help). The answer is in the ELF dynamic section and the
dynamic symbol table, which this module reads with ``struct`` alone so that no
binutils (``nm``, ``readelf``) need be installed.

Invariants: the reader never executes or maps the file; any malformed input
raises ``ElfError`` (a ``ValueError``), never an ``IndexError`` or
``struct.error``; 32/64-bit and both byte orders are handled.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ElfDynamic", "ElfError", "read_dynamic"]

_SHT_DYNAMIC = 6
_SHT_DYNSYM = 11
_SHN_UNDEF = 0
_DT_NULL = 0
_DT_NEEDED = 1
_DT_RPATH = 15
_DT_RUNPATH = 29
_STB_GLOBAL = 1
_STB_WEAK = 2
# A library's section table and dynamic tables are a few MiB at most; larger
# values mean a corrupt header, not a real library.
_TABLE_BYTES_MAX = 64 * 1024 * 1024


class ElfError(ValueError):
    """The file is not a readable ELF shared object."""


@dataclass(frozen=True, slots=True)
class ElfDynamic:
    """What the dynamic linker needs to know about one ELF object.

    ``needed`` are DT_NEEDED names in order; ``rpath``/``runpath`` the
    colon-split DT_RPATH/DT_RUNPATH entries, ``$ORIGIN`` left unexpanded;
    ``imports`` the names of undefined GLOBAL or WEAK dynamic symbols (what the
    object expects another library to provide); ``exports`` the names of
    defined GLOBAL or WEAK dynamic symbols.
    """

    needed: tuple[str, ...]
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]
    imports: frozenset[str]
    exports: frozenset[str]


def _cstring(table: bytes, offset: int) -> str:
    if not 0 <= offset < len(table):
        raise ElfError(f"string offset {offset} outside a {len(table)}-byte table")
    end = table.find(b"\0", offset)
    if end < 0:
        raise ElfError("unterminated string in string table")
    return table[offset:end].decode("utf-8", errors="replace")


def read_dynamic(path: Path) -> ElfDynamic:
    """Read the dynamic section and dynamic symbols of the ELF file at ``path``.

    Raises ``ElfError`` if the file is not ELF or is truncated or malformed,
    and ``OSError`` if it cannot be read.
    """
    with open(path, "rb") as f:
        ident = f.read(16)
        if len(ident) < 16 or ident[:4] != b"\x7fELF":
            raise ElfError(f"{path} is not an ELF file")
        if ident[4] not in (1, 2) or ident[5] not in (1, 2):
            raise ElfError(f"{path}: unknown ELF class {ident[4]} or data encoding {ident[5]}")
        is64 = ident[4] == 2
        order = "<" if ident[5] == 1 else ">"

        def read_at(offset: int, size: int) -> bytes:
            if size < 0 or size > _TABLE_BYTES_MAX:
                raise ElfError(f"{path}: implausible table size {size}")
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise ElfError(f"{path}: truncated at offset {offset}")
            return data

        if is64:
            header = read_at(0, 64)
            shoff, = struct.unpack_from(order + "Q", header, 0x28)
            shentsize, shnum = struct.unpack_from(order + "HH", header, 0x3A)
            shdr_fmt, sym_size, dyn_fmt = order + "IIQQQQIIQQ", 24, order + "qQ"
        else:
            header = read_at(0, 52)
            shoff, = struct.unpack_from(order + "I", header, 0x20)
            shentsize, shnum = struct.unpack_from(order + "HH", header, 0x2E)
            shdr_fmt, sym_size, dyn_fmt = order + "IIIIIIIIII", 16, order + "iI"
        if shnum == 0 or shentsize < struct.calcsize(shdr_fmt):
            raise ElfError(f"{path}: no usable section header table")

        raw = read_at(shoff, shentsize * shnum)
        # (type, offset, size, link) per section.
        sections: list[tuple[int, int, int, int]] = []
        for i in range(shnum):
            fields = struct.unpack_from(shdr_fmt, raw, i * shentsize)
            sh_type, sh_offset, sh_size, sh_link = fields[1], fields[4], fields[5], fields[6]
            sections.append((sh_type, sh_offset, sh_size, sh_link))

        def strtab(index: int) -> bytes:
            if not 0 <= index < len(sections):
                raise ElfError(f"{path}: section link {index} out of range")
            _, offset, size, _ = sections[index]
            return read_at(offset, size)

        needed: list[str] = []
        rpath: list[str] = []
        runpath: list[str] = []
        imports: set[str] = set()
        exports: set[str] = set()
        for sh_type, offset, size, link in sections:
            if sh_type == _SHT_DYNAMIC:
                strings = strtab(link)
                data = read_at(offset, size)
                step = struct.calcsize(dyn_fmt)
                for pos in range(0, len(data) - step + 1, step):
                    tag, value = struct.unpack_from(dyn_fmt, data, pos)
                    if tag == _DT_NULL:
                        break
                    if tag == _DT_NEEDED:
                        needed.append(_cstring(strings, value))
                    elif tag == _DT_RPATH:
                        rpath.extend(p for p in _cstring(strings, value).split(":") if p)
                    elif tag == _DT_RUNPATH:
                        runpath.extend(p for p in _cstring(strings, value).split(":") if p)
            elif sh_type == _SHT_DYNSYM:
                strings = strtab(link)
                data = read_at(offset, size)
                for pos in range(sym_size, len(data) - sym_size + 1, sym_size):
                    if is64:
                        name_off, info, _other, shndx = struct.unpack_from(order + "IBBH", data, pos)
                    else:
                        name_off, = struct.unpack_from(order + "I", data, pos)
                        info, _other, shndx = struct.unpack_from(order + "BBH", data, pos + 12)
                    if info >> 4 not in (_STB_GLOBAL, _STB_WEAK) or name_off == 0:
                        continue
                    name = _cstring(strings, name_off)
                    (imports if shndx == _SHN_UNDEF else exports).add(name)
    return ElfDynamic(
        needed=tuple(needed),
        rpath=tuple(rpath),
        runpath=tuple(runpath),
        imports=frozenset(imports),
        exports=frozenset(exports),
    )
