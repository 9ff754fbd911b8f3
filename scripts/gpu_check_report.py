"""Summarize what scripts/gpu_check.sh wrote into OUT/summary.md (and print it).

    python scripts/gpu_check_report.py OUT

Reads OUT/device.json, OUT/tests.txt, OUT/selftest.json and every OUT/bench_*.json (rows of
`selfextend bench --json`), and writes one Markdown page: the machine, the test summary, the
selftest checks, and per model and length prefill and decode tok/s, peak memory and the
SelfExtend/plain ratios. Missing parts are said to be missing, not skipped silently.
"""

import json
import re
import sys
from pathlib import Path

MIB = 2**20


def _load(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as error:
        return {"error": f"{path.name} is not JSON ({error.msg})"}


def device_section(out: Path) -> list:
    device = _load(out / "device.json")
    if not isinstance(device, dict) or "error" in device:
        return ["## Machine", "", "device.json missing or unreadable: the device step did not finish.", ""]
    lines = ["## Machine", ""]
    lines += [f"- {key}: {value}" for key, value in device.items()]
    return lines + [""]


def tests_section(out: Path) -> list:
    path = out / "tests.txt"
    if not path.exists():
        return ["## Tests", "", "tests.txt missing: the test step did not run.", ""]
    text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    summary = next((line for line in reversed(text) if re.search(r"\d+ (passed|failed|error)", line)), None)
    failed = [line for line in text if line.startswith(("FAILED ", "ERROR "))]
    lines = ["## Tests (pytest, MLX's default device)", "", f"`{summary or (text[-1] if text else 'no output')}`", ""]
    lines += [f"- {line}" for line in failed[:40]]
    return lines + ([""] if failed else [])


def selftest_section(out: Path) -> list:
    checks = _load(out / "selftest.json")
    if not isinstance(checks, list):
        why = checks["error"] if isinstance(checks, dict) else "selftest.json missing"
        return ["## selftest", "", f"{why}: the selftest step did not finish.", ""]
    lines = [
        "## selftest",
        "",
        "| check | result | max diff | reference ms | fast ms | note |",
        "|---|---|---|---|---|---|",
    ]
    for c in checks:
        if c.get("max_error") is None:
            result, error = "skipped", ""
        else:
            result = "OK" if c.get("ok") else ("FAILED" if c.get("fast_ms") is None else "MISMATCH")
            error = f"{c['max_error']:.2e}"
        fast = "" if c.get("fast_ms") is None else f"{c['fast_ms']:.2f}"
        lines.append(f"| {c['name']} | {result} | {error} | {c['reference_ms']:.2f} | {fast} | {c.get('note', '')} |")
    return lines + [""]


def bench_section(out: Path) -> list:
    lines = ["## bench", ""]
    files = sorted(out.glob("bench_*.json"))
    if not files:
        return lines + ["no bench_*.json: the bench step did not run.", ""]
    for path in files:
        name = path.stem.removeprefix("bench_")
        rows = _load(path)
        if not isinstance(rows, list):
            lines += [f"### {name}", "", f"{rows['error'] if rows else path.name + ' is empty'}", ""]
            continue
        lines += [
            f"### {name}",
            "",
            "| length | mode | prefill tok/s | decode tok/s | peak memory | KV cache |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['length']} | {r['mode']} | {r['prefill_tps']:.1f} | {r['decode_tps']:.2f} | "
                f"{r['peak_memory_bytes'] / MIB:.1f} MiB | {r['kv_cache_bytes'] / MIB:.1f} MiB |"
            )
        lines += [
            "",
            "| length | SelfExtend/plain prefill time | decode time | peak memory | KV bytes |",
            "|---|---|---|---|---|",
        ]
        by = {(r["length"], r["mode"]): r for r in rows}
        for length in sorted({r["length"] for r in rows}):
            plain, se = by.get((length, "plain")), by.get((length, "selfextend"))
            if plain is None or se is None:
                continue
            ratios = (
                plain["prefill_tps"] / se["prefill_tps"],  # time ratios: plain speed over SelfExtend's
                plain["decode_tps"] / se["decode_tps"],
                se["peak_memory_bytes"] / plain["peak_memory_bytes"],
                se["kv_cache_bytes"] / plain["kv_cache_bytes"],
            )
            lines.append(f"| {length} | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
        lines.append("")
    return lines


def report(out: Path) -> str:
    commands = out / "commands.txt"
    lines = ["# GPU check", ""]
    if commands.exists():
        lines += [
            "Commands (scripts/gpu_check.sh):",
            "",
            "```",
            commands.read_text(encoding="utf-8").strip(),
            "```",
            "",
        ]
    lines += device_section(out) + tests_section(out) + selftest_section(out) + bench_section(out)
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python scripts/gpu_check_report.py OUT_FOLDER", file=sys.stderr)
        return 2
    out = Path(args[0])
    text = report(out)
    (out / "summary.md").write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
