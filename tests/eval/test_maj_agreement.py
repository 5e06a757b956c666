"""maj@n has one definition: training validation (val/<source>/maj@n) and `opd eval grade` (maj_score in
grading_results.json) agree on the same samples, also where equal answers are written differently."""

from __future__ import annotations

import json
from collections import Counter

from opd.engines.local.validation import summarise
from opd.eval import grade
from opd.grading import grade_batch

GT = "\\frac{1}{2}"
# one half written three ways (3 votes once normalised) against "3" twice (the most frequent raw string)
RESPONSES = ["so \\boxed{\\frac{1}{2}}", "so \\boxed{3}", "so \\boxed{0.5}", "so \\boxed{3}", "so \\boxed{1/2}"]


def test_training_validation_and_grading_file_agree_on_maj(tmp_path):
    # training validation: the rollouts are graded by the rule reward, then summarised per data source
    graded = grade_batch(RESPONSES, [GT] * len(RESPONSES), workers=1)
    extracted = [g.extracted for g in graded]
    assert Counter(extracted).most_common(1)[0][0] == "3"  # raw-string voting (the old validation) picked "3": 0.0
    val = summarise(len(RESPONSES), [("toy", [g.score for g in graded], extracted, [5] * len(RESPONSES))])

    # the grading file: the same samples as an `opd eval gen` output
    gen_file = tmp_path / "toy__m__t.jsonl"
    gen_file.write_text(
        "".join(
            json.dumps({"example_id": 0, "sample_idx": i, "answer": GT, "response": r}) + "\n"
            for i, r in enumerate(RESPONSES)
        )
    )
    assert grade.main([str(gen_file), "--output", str(tmp_path / "res.json"), "--workers", "1", "--no-progress"]) == 0
    maj_score = json.loads((tmp_path / "res.json").read_text())[str(gen_file)]["maj_score"]

    assert val["val/toy/maj@5"] == maj_score == 1.0
