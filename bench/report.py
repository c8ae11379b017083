"""What every benchmark script in bench/ does with its results: markdown tables, and a report
printed and optionally written to the file that bench/results/ keeps."""

import datetime
import os
import platform
import shlex


def header(title, script, argv):
    """A report's title, the command that produced it (`script` with `argv`), and the machine:
    date, device, torch and triton versions, load average."""
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return [f"# {title}", "", f"    python bench/{script} " + shlex.join(argv), "",
            f"- Date: {datetime.date.today()}; device: {device}; torch {torch.__version__}, "
            f"triton {triton_version}; load average at the start: "
            f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}.", ""]


def table(header, rows):
    """A markdown table; every cell goes through str()."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def emit(report, out=None):
    """Print the report and, with `out`, write it there too."""
    print(report)
    if out:
        with open(out, "w") as f:
            f.write(report)
