"""Shared fixtures: a tiny random teacher folder (model + word-level tokenizer) and shards for it."""

import faulthandler
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Triton kernels on a CPU machine: Triton's interpreter must be chosen before anything imports Triton, so
# the tests named *interpreted* run in a child pytest with TRITON_INTERPRET=1 (run_interpreted); the
# parent compiles kernels for sm_90 (Triton's wheel ships ptxas). `setup_cuda.sh --cpu` (CI's set-up)
# puts Triton in a folder of its own, TRITON_CPU, off the venv's path: it joins the path of this process
# (before torch is imported) and of the interpreter's child only, not of the other subprocess tests, whose
# every start it would slow.
TRITON_CPU = os.path.join(REPO, ".venv", "triton-cpu")
if importlib.util.find_spec("triton") is None and os.path.isdir(os.path.join(TRITON_CPU, "triton")):
    sys.path.insert(0, TRITON_CPU)
HAS_TRITON = importlib.util.find_spec("triton") is not None

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

VOCAB = 256
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not (HAS_TRITON and INTERPRETING),
                                 reason="runs in the child pytest with TRITON_INTERPRET=1")
triton_on_cpu = pytest.mark.skipif(not HAS_TRITON or INTERPRETING or torch.cuda.is_available(),
                                   reason="needs Triton on a CPU machine (on CUDA the gpu tests run the kernels)")


def _signal_quietly(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def _dump_stacks_and_wait(p: psutil.Process, timeout: float = 3.0) -> None:
    """SIGABRT (faulthandler prints the Python stacks), then wait until p has ended (exited or a zombie)."""
    try:
        p.send_signal(signal.SIGABRT)
        deadline = time.time() + timeout
        while time.time() < deadline and p.status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.05)
    except psutil.NoSuchProcess:
        pass


def launch(script: str, args: list[str], nproc: int = 1, timeout: int = 300,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """python <script> (nproc 1) or torchrun --standalone with nproc processes, from the repo root, one
    OMP thread each, `env` added to the environment. Output goes to files, not pipes: torchrun starts
    each worker in a session of its own, so a worker that outlives torchrun would hold a pipe open and
    block the read forever. On a timeout every process of the tree dumps its Python stacks (SIGABRT
    with faulthandler on; torchrun paused while its workers dump, one at a time), all are killed,
    and the test fails with the output so far: a hang shows where it hung."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    path = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "PYTHONFAULTHANDLER": "1", **(env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(launcher + [script, *args], cwd=REPO, text=True, stdout=out, stderr=err, env=env)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            tree = psutil.Process(proc.pid)
            family = [*tree.children(recursive=True), tree]  # torchrun's workers are its children
            # torchrun paused first: seeing a worker end, it would SIGTERM the others before their dumps
            _signal_quietly(tree, signal.SIGSTOP)
            for p in family[:-1]:  # one at a time: dumps written at once interleave their lines in the file
                _dump_stacks_and_wait(p)
            _signal_quietly(tree, signal.SIGCONT)
            _dump_stacks_and_wait(tree)
            for p in family:
                _signal_quietly(p, signal.SIGKILL)
            psutil.wait_procs(family, timeout=5)
            proc.wait()
        out.seek(0), err.seek(0)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
    if timed_out:  # faulthandler's long "Extension modules: ..." lines dropped: the stacks must fit
        stacks = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("Extension modules:"))
        pytest.fail(f"{script} {' '.join(args)} ran past {timeout} s and was killed\nstdout:\n"
                    f"{result.stdout[-3000:]}\nstderr (with every process's stacks):\n{stacks[-40000:]}")
    return result


def tiny_tokenizer(vocab: int = VOCAB):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0", unk_token="t1")


def make_teacher_dir(path: str, layers: int = 2, seed: int = 0) -> str:
    """A tiny random Llama (GQA 4q/2kv heads, hidden 64) + tokenizer saved as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, eos_token_id=0,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def make_shards(data_dir: str, tokenizer, n_train: int = 20000, n_val: int = 4000, seed: int = 0) -> str:
    """Shards of a repeated random 61-token cycle with some EOS noise: learnable in a few steps."""
    from hybrid.shards import sha256_file, tokenizer_info, write_shard
    rng = np.random.default_rng(seed)
    pattern = rng.integers(1, VOCAB, size=61)
    shards = []
    for split, n in (("train", n_train), ("val", n_val)):
        tokens = np.tile(pattern, n // len(pattern) + 1)[:n]
        tokens[rng.integers(0, n, size=n // 50)] = 0
        name = f"{split}_000000.bin"
        write_shard(os.path.join(data_dir, name), tokens, VOCAB)
        sha = sha256_file(os.path.join(data_dir, name))
        shards.append({"file": name, "split": split, "n_tokens": n, "sha256": sha})
    with open(os.path.join(data_dir, "manifest.json"), "w") as f:
        json.dump({**tokenizer_info(tokenizer), "dtype": "uint16", "shards": shards}, f)
    return data_dir


TEST_TIME_LIMIT_S = 900  # the slowest test takes about a minute on a 2-core machine


@pytest.fixture(autouse=True)
def watchdog():
    """A test that hangs ends its worker with every thread's stack on stderr (pytest-xdist reports the
    crashed test and goes on), instead of holding CI until its time limit."""
    faulthandler.dump_traceback_later(TEST_TIME_LIMIT_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core machine OpenMP threads that wait
    for each other made steps 10-100x slower (8 ms -> 1.7 s). Subprocess tests set OMP_NUM_THREADS=1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    """-> {"model": teacher HF dir (4 layers), "data": shard dir}."""
    root = tmp_path_factory.mktemp("tiny")
    model = make_teacher_dir(str(root / "model"), layers=4)
    return {"model": model, "data": make_shards(str(root / "data"), tiny_tokenizer())}


def run_interpreted(test_file: str, passed: int) -> None:
    """Run test_file's tests named *interpreted* in a child pytest under Triton's interpreter: all pass, none skip."""
    path = os.pathsep.join([TRITON_CPU, REPO, os.environ.get("PYTHONPATH", "")])
    r = launch("-m", ["pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", test_file, "-k", "interpreted"],
               env={"TRITON_INTERPRET": "1", "PYTHONPATH": path})
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert f"{passed} passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]
