"""What every benchmark script in bench/ does with its results: markdown tables, and a report
printed and optionally written to the file that bench/results/ keeps."""


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
