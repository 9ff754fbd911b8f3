"""Run issue 12's hostile and unlucky inputs (and round 2's, issues 28 and 29: the cases named
"28." and "29."; round 3, issues 27 and 28 on the command line: "27." and
"28.7"-"28.8") against the installed `selfextend` and print the
table docs/reliability.md keeps: each case, what happened (exit code, the last line of
stderr, seconds), and whether that is the promised behaviour.

    nice python scripts/reliability_cases.py > /tmp/cases.md

Each case runs in bash, under a 6 GB address-space limit (a case that would eat the machine
fails instead) and a time limit, in a scratch folder with its own document cache. Needs
../shared (stories260K and the texts); the tmpfs case needs root and is marked when it
cannot mount.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared").resolve()
T = SHARED / "models" / "stories260K"
STORY = SHARED / "text" / "tinystories_sample.txt"
MEMORY_LIMIT_KB = 6_000_000


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def last_error(self) -> str:
        lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def one_line_error(self, code=None) -> bool:
        errors = [line for line in self.stderr.splitlines() if line.startswith("error:")]
        wanted = self.code != 0 if code is None else self.code == code
        return wanted and len(errors) == 1 and "Traceback" not in self.stderr


@dataclass
class Case:
    name: str
    command: str
    promise: Callable[[Result], bool]
    owner: str = ""  # "" (this part of the issue) or "CLI part"
    setup: str = ""
    timeout: int = 180


def run(case: Case, scratch: Path) -> Result:
    env = {**os.environ, "SELFEXTEND_CACHE_DIR": str(scratch / "cache"), "T": str(T), "STORY": str(STORY)}
    env.pop("SELFEXTEND_DEBUG", None)
    script = f"set -u; cd {scratch}; {case.setup}\nulimit -v {MEMORY_LIMIT_KB}; {case.command}"
    started = time.perf_counter()
    try:
        done = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, errors="replace", env=env, timeout=case.timeout
        )
        return Result(done.returncode, done.stdout, done.stderr, time.perf_counter() - started)
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout.decode(errors="replace") if isinstance(expired.stdout, bytes) else expired.stdout or ""
        return Result(-9, out, f"(timed out after {case.timeout}s)", time.perf_counter() - started)


def evil_folder() -> str:
    return (
        "cp -r $T evil && chmod -R u+w evil && python - <<'EOF'\n"
        "import json\n"
        "c = json.load(open('evil/tokenizer_config.json'))\n"
        "c.update(tokenizer_class='EvilTok', auto_map={'AutoTokenizer': ['evil.EvilTok', 'evil.EvilTok']})\n"
        "json.dump(c, open('evil/tokenizer_config.json', 'w'))\n"
        "open('evil/evil.py', 'w').write(\"open('EVIL_RAN', 'w').write('x')\\n\")\n"
        "EOF\n"
        "head -c 1500 $STORY > doc.txt;"
    )


def python_check(code: str) -> str:
    return f"python - <<'EOF'\n{code}\nEOF"


DOC = "head -c 1500 $STORY > doc.txt;"
FLIP = (
    "python -c \"import glob; p = glob.glob('cache/*.safetensors')[0]; d = bytearray(open(p, 'rb').read()); "
    "d[-200] ^= 255; open(p, 'wb').write(bytes(d))\";"
)
REWRITE_WEIGHTS = (
    "python - <<'EOF'\n"
    "import os, struct, time\n"
    "p = 'model/model.safetensors'; st = os.stat(p); d = bytearray(open(p, 'rb').read())\n"
    "n = struct.unpack('<Q', d[:8])[0]\n"
    "for i in range(8 + n + 4000, len(d) - 4, 4096):\n"
    "    d[i:i+4] = struct.pack('<f', struct.unpack('<f', d[i:i+4])[0] * 2)\n"
    "time.sleep(0.05); open(p, 'r+b').write(d); os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))\n"
    "EOF\n"
)


def json_field(result: Result, field: str):
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])[field]
    except (ValueError, IndexError, KeyError):
        return None


CASES = [
    # 1. code from a model folder
    Case(
        "1. model folder with tokenizer code (chat, 'y' piped)",
        "printf 'y\\ny\\nWho?\\n' | selfextend chat doc.txt -m evil -n 2; echo rc=$? >&2; test ! -e EVIL_RAN",
        lambda r: "--trust-remote-code" in r.stderr and "Do you wish" not in r.stdout + r.stderr and r.code == 0,
        setup=evil_folder(),
    ),
    Case(
        "1. same folder, ask --json",
        "printf 'y\\n' | selfextend ask doc.txt -q Who? -m evil --json",
        lambda r: r.one_line_error() and r.stdout == "" and "--trust-remote-code" in r.stderr,
        setup=evil_folder(),
    ),
    # 2. input size
    Case("2. ask /dev/zero", "selfextend ask /dev/zero -q x -m $T", lambda r: r.one_line_error() and r.seconds < 30),
    Case("2. yes | ask -", "yes | selfextend ask - -q x -m $T", lambda r: r.one_line_error() and r.seconds < 60),
    Case(
        "2. a 200 MB file",
        "selfextend ask big.txt -q x -m $T",
        lambda r: r.one_line_error() and r.seconds < 30,
        setup="yes 'All work and no play makes Jack a dull boy.' | head -c 200000000 > big.txt;",
    ),
    Case(
        "2. a 20 MB file",
        "selfextend ask big.txt -q x -m $T",
        lambda r: r.one_line_error() and r.seconds < 30,
        setup="yes 'All work and no play makes Jack a dull boy.' | head -c 20000000 > big.txt;",
    ),
    Case(
        "2. a 2 GB sparse file",
        "selfextend ask sparse.txt -q x -m $T",
        lambda r: r.one_line_error() and r.seconds < 30,
        setup="truncate -s 2G sparse.txt;",
    ),
    Case(
        "2. a long book gets through the limit (Emma x 4, 3.5 MB)",
        "for i in 1 2 3 4; do cat $(dirname $STORY)/austen-emma.txt; done > book.txt; "
        + python_check(
            "from selfextend_mlx.app.documents import read_document\n"
            "d = read_document('book.txt'); print(f'{len(d.text):,} characters read')"
        ),
        lambda r: r.code == 0,
    ),
    # 3. cache clear on a folder it did not write
    Case(
        "3. cache clear --cache-dir MODEL_FOLDER",
        "selfextend cache clear --cache-dir model --yes 2> err; rc=$?; "
        "ls model | tr '\\n' ' ' >&2; cat err >&2; exit $rc",
        lambda r: r.code == 1 and "is not a selfextend document cache" in r.stderr and "model.safetensors" in r.stderr,
        setup="cp -r $T model && chmod -R u+w model;",
    ),
    # 4. weights changed at the same path
    Case(
        "4. weights changed at the same path (mtime restored), ask again",
        "selfextend ask doc.txt -q Who? -m model -n 6 --json > a.json && "
        + REWRITE_WEIGHTS
        + "selfextend ask doc.txt -q Who? -m model -n 6 --json",
        lambda r: json_field(r, "document_cache") == "miss",
        setup="cp -r $T model && chmod -R u+w model;" + DOC,
    ),
    # 5. corrupted entry
    Case(
        "5. flipped bytes in an entry's tensor data",
        "selfextend ask doc.txt -q Who? -m $T -n 6 --json > a.json && " + FLIP + "selfextend ask doc.txt -q Who? "
        "-m $T -n 6 --json",
        lambda r: json_field(r, "document_cache") == "miss" and "checksum" in r.stderr and r.code == 0,
        setup=DOC,
    ),
    # 6. full disk
    Case(
        "6. cache dir on a 1 MB tmpfs (a 4k-token entry: 2.7 MB)",
        "selfextend ask doc.txt -q Who? -m $T -n 6 --cache-dir tiny 2> err; rc=$?; ls -A tiny | tr '\\n' ' ' >&2; "
        "grep 'could not save' err >&2; umount tiny; exit $rc",
        lambda r: r.code == 0 and r.stdout.strip() != "" and "could not save the document cache" in r.stderr,
        setup="mkdir tiny && mount -t tmpfs -o size=1m tmpfs tiny || exit 99;" + DOC.replace("1500", "8000"),
    ),
    # 7. non-UTF-8 bytes
    Case(
        "7. -q $'caf\\xe9?'",
        "selfextend ask doc.txt -q $'caf\\xe9?' -m $T -n 4",
        lambda r: r.code == 0 or r.one_line_error(),
        owner="CLI part",
        setup=DOC,
    ),
    Case(
        "7. the same bytes in a chat line",
        "printf 'caf\\xe9?\\nWho is Lily?\\n' | selfextend chat doc.txt -m $T -n 4",
        lambda r: r.code == 0 and "TypeError" not in r.stderr,
        owner="CLI part",
        setup=DOC,
    ),
    Case(
        "7. the same bytes in a file name",
        "selfextend ask $'caf\\xe9.txt' -q Who? -m $T -n 4",
        lambda r: r.code == 0 and r.stdout.strip() != "",
        setup="head -c 1500 $STORY > $'caf\\xe9.txt';",
    ),
    # 8. short legacy-encoded text
    Case(
        "8. short Latin-1 French, cp1252 quotes, German",
        python_check(
            "from selfextend_mlx.app.documents import decode_text\n"
            "for t, e in [('Le café était fermé.', 'latin-1'), ('\\u201cHi,\\u201d it\\u2019s\\u2026', 'cp1252'),"
            " ('Grüße aus Köln.', 'cp1252')]:\n"
            "    got = decode_text('x', t.encode(e)); print(got); assert got == t, got"
        ),
        lambda r: r.code == 0,
    ),
    # 9. selftest bounds
    Case(
        "9. selftest --keys 1000000000",
        "selfextend selftest --keys 1000000000",
        lambda r: r.one_line_error() and r.code != 139,
        owner="CLI part",
    ),
    # 10. SIGTERM during a save
    Case(
        "10. SIGTERM while ask runs (no temp file, exit 143)",
        "selfextend ask doc.txt -q Who? -m $T -n 200 2> err & pid=$!; sleep 4; kill -TERM $pid; wait $pid; rc=$?; "
        "echo temp files left: $(ls -A cache 2>/dev/null | grep -c '^\\.[0-9a-f]') >&2; tail -1 err >&2; exit $rc",
        lambda r: r.code == 143 and "temp files left: 0" in r.stderr,
        owner="CLI part",
        setup="head -c 6000 $STORY > doc.txt;",
    ),
    # smaller
    Case(
        "PDF with a page loop",
        "selfextend ask loop.pdf -q x -m $T",
        lambda r: r.one_line_error() and "loop.pdf" in r.last_error,
        setup=python_check(
            "import sys; sys.path.insert(0, '" + str(ROOT / "tests") + "')\n"
            "from pdf_fixture import make_pdf\n"
            "open('loop.pdf', 'wb').write(make_pdf(['Hi.']).replace(b'/Kids [4 0 R]', b'/Kids [2 0 R]'))"
        ),
    ),
    Case(
        "PDF decompression bomb (80 MB of spaces in 80 KB)",
        "selfextend ask bomb.pdf -q x -m $T",
        lambda r: r.one_line_error() and "bomb.pdf" in r.last_error,
        setup=python_check(
            "import sys, zlib; sys.path.insert(0, '" + str(ROOT / "tests") + "')\n"
            "from pdf_fixture import make_pdf\n"
            "z = zlib.compressobj(9); body = b''.join(z.compress(b' ' * 10**6) for _ in range(80)) + z.flush()\n"
            "pdf = make_pdf(['x'])\n"
            "old = pdf[pdf.index(b'5 0 obj'):pdf.index(b'endobj', pdf.index(b'5 0 obj'))]\n"
            "head = b'5 0 obj\\n<< /Length %d /Filter /FlateDecode >>\\nstream\\n' % len(body)\n"
            "new = head + body + b'\\nendstream\\n'\n"
            "open('bomb.pdf', 'wb').write(pdf.replace(old, new))"
        ),
    ),
    Case(
        "HTML on stdin starting with a comment",
        "printf '<!-- c --><html><script>var secret=1;</script><p>Tom has a ball.</p></html>' | python -c "
        "\"import sys; from selfextend_mlx.app.documents import read_document as r; d = r('-'); "
        "print(d.format, repr(d.text)); assert d.format == 'html' and 'secret' not in d.text\"",
        lambda r: r.code == 0,
    ),
    Case(
        "HTML on stdin starting with <?xml / <head>",
        "for s in '<?xml version=\"1.0\"?><html>' '<head>'; do printf \"$s<script>var secret=1;</script><p>Hi.</p>\" | "
        "python -c \"import sys; from selfextend_mlx.app.documents import read_document as r; d = r('-'); "
        "print(d.format); assert d.format == 'html' and 'secret' not in d.text\" || exit 1; done",
        lambda r: r.code == 0,
    ),
    Case("-G 100", DOC + "selfextend ask doc.txt -q x -m $T -G 100", lambda r: r.one_line_error()),
    Case("--temp inf", DOC + "selfextend ask doc.txt -q x -m $T --temp inf", lambda r: r.one_line_error(), "CLI part"),
    Case("-q ''", DOC + "selfextend ask doc.txt -q '' -m $T", lambda r: r.one_line_error(), "CLI part"),
    Case(
        "SELFEXTEND_MAX_MEMORY=-5GB",
        DOC + "SELFEXTEND_MAX_MEMORY=-5GB selfextend ask doc.txt -q x -m $T",
        lambda r: r.one_line_error(),
    ),
    Case(
        "SELFEXTEND_MAX_MEMORY=inf",
        DOC + "SELFEXTEND_MAX_MEMORY=inf selfextend ask doc.txt -q x -m $T",
        lambda r: r.one_line_error() and "OverflowError" not in r.stderr,
    ),
    Case(
        "truncated model.safetensors",
        DOC + "selfextend ask doc.txt -q x -m cut",
        lambda r: r.one_line_error() and "truncated or corrupt" in r.stderr,
        setup="cp -r $T cut && chmod -R u+w cut && truncate -s 500000 cut/model.safetensors;",
    ),
    Case(
        "foo/.. as a model id",
        DOC + "selfextend ask doc.txt -q x -m foo/..",
        lambda r: r.one_line_error() and "HFValidationError" not in r.stderr,
    ),
    Case(
        "GGUF with a corrupt size field",
        DOC + "selfextend ask doc.txt -q x -m bad.gguf",
        lambda r: r.one_line_error() and "MemoryError" not in r.stderr,
        setup=python_check(
            "import struct\n"
            "open('bad.gguf', 'wb').write(b'GGUF' + struct.pack('<IQQ', 3, 0, 1) + struct.pack('<Q', 4) + b'name'"
            " + struct.pack('<IQ', 8, 2**62))"
        ),
    ),
    Case(
        "'default: 7' in a user registry",
        "SELFEXTEND_MODELS=mine.yaml selfextend models",
        lambda r: r.one_line_error() and "AttributeError" not in r.stderr,
        setup="printf 'default: 7\\nmodels: []\\n' > mine.yaml;",
    ),
    Case(
        "closed stdout",
        DOC + "selfextend ask doc.txt -q Who? -m $T -n 4 >&-",
        lambda r: "Traceback" not in r.stderr,
        "CLI part",
    ),
    Case(
        "Ctrl-C in the first second",
        DOC + "python -c \"import signal, subprocess, sys, time; p = subprocess.Popen(['selfextend', 'ask', 'doc.txt', "
        "'-q', 'x', '-m', '$T']); time.sleep(0.5); p.send_signal(signal.SIGINT); sys.exit(p.wait())\"",
        lambda r: r.code == 130 and "Traceback" not in r.stderr,
        "CLI part",
    ),
    Case(
        "SELFEXTEND_DEBUG=0",
        "SELFEXTEND_DEBUG=0 selfextend ask /nonexistent -q x -m $T",
        lambda r: r.one_line_error() and "Traceback" not in r.stderr,
        "CLI part",
    ),
    Case(
        "eval ppl --buckets past the input",
        "selfextend eval ppl -m $T -f $STORY --tokens 1k --buckets 2k,4k",
        lambda r: r.one_line_error() or "bucket" in r.stderr,
        "CLI part",
        timeout=300,
    ),
    Case(
        "--plot into an unwritable folder",
        "selfextend eval ppl -m $T -f $STORY --tokens 1k --plot /proc/none/p.png",
        lambda r: r.one_line_error() and r.seconds < 30,
        "CLI part",
        timeout=300,
    ),
    Case(
        "bench -l 512 --modes plain on stories260K",
        "selfextend bench -m $T -l 512 --modes plain --decode-steps 2",
        lambda r: r.code == 0,
        "CLI part",
        timeout=300,
    ),
]


TEMPLATE_FOLDER = (
    "cp -r $T tpl && chmod -R u+w tpl && python - <<'EOF'\n"
    "import json\n"
    "c = json.load(open('tpl/tokenizer_config.json'))\n"
    "c['chat_template'] = '{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}'\n"
    "json.dump(c, open('tpl/tokenizer_config.json', 'w'))\n"
    "EOF\n"
)
# A server on a free port, asked by curl from loopback; each curl prints its status code.
SERVER = (
    "selfextend serve -m $T --port 0 --no-cache > url.txt 2> log.txt & pid=$!; "
    "for i in $(seq 300); do grep -q http url.txt 2>/dev/null && break; sleep 0.2; done; "
    'url=$(grep -o \'http://[^ ]*\' url.txt); body=\'{"messages":[{"role":"user","content":"hi"}],"max_tokens":2}\'; '
    'ask() { curl -s -o /dev/null -w \'%{http_code} \' -m 30 "$@" --data "$body" $url/chat/completions; }; '
)
ROUND_2 = [
    Case(
        "28.1 punctuation only, past the reach",
        "python -c \"open('p.txt','w').write('!?., ;: ' * 40000)\"; selfextend ask p.txt -q 'What is it?' -m $T -n 4",
        lambda r: r.code == 0 and "max() arg" not in r.stderr,
        timeout=300,
    ),
    Case(
        "28.2 chat template with nested loops of 100,000",
        DOC + "selfextend ask doc.txt -q x -m tpl -n 2",
        lambda r: r.one_line_error() and "chat template ran for more than" in r.stderr and r.seconds < 60,
        setup=TEMPLATE_FOLDER,
    ),
    Case(
        "28.3 selftest --keys 1m with 4 GB",
        "SELFEXTEND_MAX_MEMORY=4GB selfextend selftest --keys 1m",
        lambda r: r.one_line_error() and "not enough memory" in r.stderr and r.seconds < 30,
    ),
    Case(
        "28.6 a FIFO no one writes to",
        "mkfifo f; selfextend ask f -q x -m $T",
        lambda r: r.one_line_error() and "named pipe" in r.stderr and r.seconds < 40,
    ),
    Case(
        "28.6 an endless chat line (12 MB, no newline)",
        DOC + "head -c 12000000 /dev/zero | tr '\\0' a | selfextend chat doc.txt -m $T -n 2",
        lambda r: r.one_line_error() and "MemoryError" not in r.stderr and "input limit" in r.stderr,
        timeout=120,
    ),
    Case(
        "29.1 text/plain POST, rebound Host, foreign Origin (curl on loopback)",
        SERVER + "ask -H 'Content-Type: text/plain' -H 'Origin: http://evil.example'; "
        "ask -H 'Content-Type: text/plain'; ask -H 'Host: evil.example' -H 'Content-Type: application/json'; "
        "ask -H 'Content-Type: application/json' >&2; kill $pid; wait $pid",
        lambda r: r.stdout.split() == ["403", "415", "421"] and r.stderr.strip().endswith("200"),
        timeout=180,
    ),
    Case(
        "29.2 HTML of 20,000 unclosed tags",
        "python -c \"open('x.html','w').write('<!doctype html>' + '<a ' * 20000 + '<p>hi</p>')\"; "
        "selfextend ask x.html -q hi -m $T -n 2; cat x.html | selfextend ask - -q hi -m $T -n 2",
        lambda r: "Traceback" not in r.stderr and r.seconds < 60,
    ),
    Case(
        "29.3 Chinese past the reach: ask",
        "python -c \"open('z.txt','w').write('从前有一个小女孩，她的名字叫莉莉。她喜欢在阳光下玩耍。' * 800)\"; "
        "selfextend ask z.txt -q who -m $T -n 4",
        lambda r: r.code == 0,
        timeout=300,
    ),
    Case(
        "29.3 base64 past the reach: summarize",
        "head -c 60000 /dev/urandom | base64 -w0 > b.txt; selfextend summarize b.txt -m $T -n 4",
        lambda r: r.code == 0,
        timeout=600,
    ),
    Case(
        "29.5 --cache-dir on a folder of the user's files",
        "mkdir mydocs; echo mine > mydocs/notes.txt; head -c 6000 $STORY > d.txt; "
        "selfextend ask d.txt -q x -m $T -n 2 --cache-dir mydocs; ls -A mydocs >&2",
        lambda r: r.code == 0 and r.last_error == "notes.txt" and "is not a selfextend document cache" in r.stderr,
        timeout=120,
    ),
    Case(
        "29.6 escapes in piped text, then cache list",
        "{ printf '\\033]0;owned\\007\\033[2J '; head -c 6000 $STORY; } | selfextend ask - -q x -m $T -n 2 "
        "&& selfextend cache list | od -c | grep -c '033' >&2",
        lambda r: r.last_error == "0",
        timeout=120,
    ),
    Case(
        "29.6 an error naming a file with a newline and escapes",
        "selfextend ask \"$(printf 'a\\n\\033[2Jb.txt')\" -q x -m $T 2>&1 | od -c | grep -c '033' >&2",
        lambda r: r.last_error == "0",
    ),
]
CASES += ROUND_2
# Round 3 (issues 27 and 28, the command line's part): usage errors, the cache limit, the
# eval template bound, escaped status lines.
ROUND_3 = [
    Case(
        "27.1 ask doc -q with no question",
        DOC + "selfextend ask doc.txt -q",
        lambda r: r.one_line_error(2) and r.stderr.strip().endswith("(see selfextend ask --help)"),
        owner="CLI part",
    ),
    Case(
        "27.2 summarize --style bulets",
        DOC + "selfextend summarize doc.txt --style bulets",
        lambda r: r.one_line_error(2) and "Value error" not in r.stderr and "'bulets' is not one of" in r.stderr,
        owner="CLI part",
    ),
    Case(
        "27.3 -G 0 and -G abc",
        DOC + "selfextend ask doc.txt -q x -G 0; selfextend ask doc.txt -q x -G abc",
        lambda r: "Input should be" not in r.stderr and "'abc' is not a whole number" in r.stderr,
        owner="CLI part",
    ),
    Case(
        "27.4 two documents with --cache-max 1M (one entry fits)",
        "head -c 3000 $STORY > a.txt; tail -c 3000 $STORY > b.txt; "
        "for f in a.txt b.txt; do selfextend ask $f -q x -m $T -n 2 --cache-max 1M --no-progress; done; "
        "ls cache | grep -c safetensors >&2",
        lambda r: r.code == 0 and "removed 1 least recently used entry" in r.stderr and r.last_error == "1",
        owner="CLI part",
        timeout=120,
    ),
    Case(
        "28.7 eval --chat-template with nested loops of 100,000",
        "selfextend eval passkey -m tpl --chat-template --lengths 300 --depths 0.5 --trials 1",
        lambda r: r.one_line_error() and "chat template ran for more than" in r.stderr and r.seconds < 60,
        owner="CLI part",
        setup=TEMPLATE_FOLDER,
    ),
    Case(
        "28.8 a model folder named with ESC[2J and a newline (the header names it)",
        DOC + 'm="$(printf \'m\\033[2J\\nx\')"; cp -r $T "$m"; '
        "selfextend ask doc.txt -q x -m \"$m\" -n 2 --no-progress 2>&1 >/dev/null | od -c | grep -c '033' >&2",
        lambda r: r.last_error == "0",
        owner="CLI part",
    ),
]
CASES += ROUND_3


def main() -> int:
    only = sys.argv[1:]
    print("| case | part | exit | seconds | what it said (last line of stderr) | as promised |")
    print("|---|---|---|---|---|---|")
    for case in CASES:
        if only and not any(word in case.name for word in only):
            continue
        scratch = Path(tempfile.mkdtemp(prefix="selfextend-case-"))
        try:
            result = run(case, scratch)
        finally:
            subprocess.run(["umount", str(scratch / "tiny")], capture_output=True)
            shutil.rmtree(scratch, ignore_errors=True)
        said = result.last_error.replace("|", "\\|")[:160]
        verdict = "not run (no tmpfs)" if result.code == 99 else ("yes" if case.promise(result) else "**no**")
        part = case.owner or "hardening"
        print(f"| {case.name} | {part} | {result.code} | {result.seconds:.1f} | {said} | {verdict} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
