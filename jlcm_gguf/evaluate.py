"""Running the patched llama.cpp tools on GGUF files: perplexity, a one-turn answer, the float reference."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def build_dir() -> Path:
    return Path(os.environ.get("JLCM_BUILD_DIR", ROOT / "build"))


def tool(name: str) -> Path:
    path = build_dir() / "bin" / name
    if not path.exists():
        raise SystemExit(f"error: {path} is missing; run scripts/setup.sh first")
    return path


def wikitext_test(dest_dir: Path) -> Path:
    """The WikiText-2 test text from ../shared, normalised to LF line endings (evaluation only)."""
    if not SHARED_WIKITEXT.exists():
        raise FileNotFoundError(f"{SHARED_WIKITEXT} is not there")
    out = dest_dir / "wiki.test.txt"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(SHARED_WIKITEXT.read_bytes().replace(b"\r\n", b"\n").replace(b"\r", b"\n"))
    return out


LLAMA_CPP_DOCS_SHA256 = "c39b2cd9d2552085d44fb9404d791218a1ac5e1b59bce96cb095a9836f22397a"


def llama_cpp_docs(dest_dir: Path) -> Path:
    """A second evaluation text, technical prose unlike WikiText and disjoint from the calibration text:
    every Markdown file under docs/ of the pinned llama.cpp (the sdist scripts/fetch_llama.py checks by
    sha256), in path order, each preceded by its path, LF line endings. Checked against its own sha256."""
    from .convert import llama_cpp_dir
    docs = llama_cpp_dir() / "docs"
    files = sorted(p for p in docs.rglob("*.md") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no Markdown files under {docs}")
    text = "".join(f"# {p.relative_to(docs).as_posix()}\n\n"
                   + p.read_bytes().decode("utf-8").replace("\r\n", "\n").strip("\n") + "\n\n" for p in files)
    data = text.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    if digest != LLAMA_CPP_DOCS_SHA256:
        raise RuntimeError(f"llama.cpp docs text has sha256 {digest}, expected {LLAMA_CPP_DOCS_SHA256}: "
                           f"is {docs} the pinned, unmodified tree?")
    out = dest_dir / "llama-cpp-docs.txt"
    if not out.exists() or out.read_bytes() != data:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    return out


def calibration_overlap(text: Path, n: int = 12) -> int:
    """How many n-word passages of an evaluation text also occur in the calibration text (0: disjoint)."""
    from .calib import default_calibration_text

    def passages(path: Path) -> set[int]:
        words = path.read_text(encoding="utf-8").split()
        return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}
    return len(passages(text) & passages(default_calibration_text()))


EVAL_TEXTS = {"wikitext-2": wikitext_test, "llama.cpp-docs": llama_cpp_docs}


def perplexity(model: Path, text: Path, chunks: int, ctx: int = 512, threads: int = 2) -> tuple[float, float]:
    """llama-perplexity's final estimate and its +/- error (run again, up to 3 times, if its asynchronous logger
    dropped the final line, as it does now and then on a loaded machine)."""
    for _ in range(3):
        res = subprocess.run([str(tool("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(ctx),
                              "--chunks", str(chunks), "-t", str(threads)], capture_output=True, text=True)
        m = re.search(r"Final estimate: PPL = ([0-9.]+|nan|inf) \+/- ([0-9.]+|nan|inf)", res.stdout + res.stderr)
        if res.returncode != 0 or m:
            break
    if res.returncode != 0 or not m:
        raise RuntimeError(f"llama-perplexity failed on {model}:\n{(res.stdout + res.stderr)[-3000:]}")
    return float(m.group(1)), float(m.group(2))


def answer(model: Path, prompt: str, n_predict: int = 48, threads: int = 2) -> str:
    """One chat turn with llama-cli (greedy)."""
    res = subprocess.run([str(tool("llama-cli")), "-m", str(model), "-p", prompt, "-st", "-n", str(n_predict),
                          "-t", str(threads), "--temp", "0"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"llama-cli failed on {model}:\n{res.stderr[-3000:]}")
    out = res.stdout
    start = out.rfind("> " + prompt)
    text = out[start + len(prompt) + 2:] if start >= 0 else out
    return re.sub(r"\[ Prompt: .*", "", text, flags=re.S).strip()


def reference_gguf(hf_dir: Path, out: Path) -> Path:
    """The float reference as GGUF (F32), written by the vendored converter itself."""
    if out.exists():
        return out
    from .convert import llama_cpp_dir
    tmp = out.with_name(out.name + ".tmp")
    subprocess.run([sys.executable, str(llama_cpp_dir() / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", "f32",
                    "--outfile", str(tmp)], check=True, capture_output=True)
    os.replace(tmp, out)
    return out
