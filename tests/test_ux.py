"""A new user's first hour: the export's tokenizer loads without trust_remote_code, progress lines,
the interrupt message, and the plots (written, non-empty, atomically)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_export_tokenizer_loads_without_remote_code(tmp_path):
    """AutoTokenizer on the export's tokenizer/ folder, stdin closed, no trust_remote_code: it loads
    the stock tokenizer without the "run the custom code?" prompt and encodes like the teacher's."""
    import export
    from hybrid.surgery import build_student
    from hybrid.teacher import load_teacher
    from tests.conftest import make_teacher_dir
    teacher_dir = make_teacher_dir(str(tmp_path / "teacher"), layers=2)
    teacher, tokenizer = load_teacher(teacher_dir)
    student = build_student(teacher, ["gdn", "softmax"])
    out = str(tmp_path / "out")
    export.write_export(export.hybrid_model(student, ["gdn", "softmax"], {}), tokenizer, out, torch.float32)
    code = ("import sys; from transformers import AutoTokenizer; "
            "t = AutoTokenizer.from_pretrained(sys.argv[1]); print(t('t5 t7 t9', add_special_tokens=False).input_ids)")
    run = subprocess.run([sys.executable, "-c", code, os.path.join(out, "tokenizer")], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert "custom code" not in run.stdout + run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == tokenizer("t5 t7 t9", add_special_tokens=False).input_ids
