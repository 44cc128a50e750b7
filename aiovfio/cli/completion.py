"""Shell completion for bash and zsh, generated from the parser by shtab.

`aiovfio completion bash > /etc/bash_completion.d/aiovfio` (or
`~/.local/share/bash-completion/completions/aiovfio`);
`aiovfio completion zsh > "${fpath[1]}/_aiovfio"`. PCI addresses complete from
/sys/bus/pci/devices. shtab writes a static script once, so a Tab press runs
no Python (argcomplete would start the interpreter and import aiovfio on
every one); it is the optional extra `aiovfio[completion]`.
"""

from __future__ import annotations

from ..errors import SetupError
from .parser import build_parser

__all__ = ["script"]

_PREAMBLE = {
    "bash": """
_aiovfio_bdf() {
  compgen -W "$(command ls /sys/bus/pci/devices 2>/dev/null)" -- "$1"
}
""",
    "zsh": """
_aiovfio_bdf() {
  local -a bdfs
  bdfs=(${(f)"$(command ls /sys/bus/pci/devices 2>/dev/null)"})
  _describe 'PCI address' bdfs
}
""",
}


def script(shell: str) -> str:
    """The completion script for `shell` ("bash" or "zsh")."""
    try:
        import shtab
    except ImportError:
        raise SetupError(
            "shell completion needs shtab: `pip install 'aiovfio[completion]'` (or `pip install "
            "shtab`)"
        ) from None
    if shell not in _PREAMBLE:
        raise SetupError(f"no completion for {shell!r}: bash or zsh")
    parser = build_parser()
    return shtab.complete(parser, shell=shell, preamble=_PREAMBLE[shell])
