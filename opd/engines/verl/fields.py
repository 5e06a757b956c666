"""The names the OPD trainer mode shares between the driver, the logits hooks and TransferQueue.

A pass is selected by ``opd_phase`` in the batch's extra_info (verl hands extra_info to every micro-batch as
non-tensor data). Read passes write per-packed-row fields (one key per top-k slot, see `opd.engines.verl.tensors`);
the driver writes the update's targets as response-long nested fields that keep the slot dimension.
"""

PHASE = "opd_phase"
READ_STUDENT = "read_student"  # actor: log p at the sampled token, entropy, own top-k
READ_TEACHER = "read_teacher"  # teacher: the same, plus log q at the student's top-k ids
READ_STUDENT_AT_TEACHER = "read_student_at_teacher"  # actor: log p at the teacher's top-k ids (only_tch, union...)
UPDATE = "update"  # actor: log p at the target slots, with gradient, then the OPD loss
READ_FULL_KL = "read_full_kl"  # actor, full vocabulary: the exact reverse KL against the teacher's head
READ_REFERENCE = "read_reference"  # reference (USE_KL, in the teacher's workers): log p_ref at the target slots

# read passes: per packed row, [L] each (ids as int64)
STUDENT_LP, STUDENT_ENTROPY, STUDENT_TOPK_IDS, STUDENT_TOPK_LP = "opd_s_lp", "opd_s_ent", "opd_s_id", "opd_s_tlp"
TEACHER_LP, TEACHER_ENTROPY, TEACHER_TOPK_IDS, TEACHER_TOPK_LP = "opd_t_lp", "opd_t_ent", "opd_t_id", "opd_t_tlp"
TEACHER_AT_STUDENT = "opd_t_at_s"  # log q at the student's top-k ids
STUDENT_AT_TEACHER = "opd_s_at_t"  # log p at the teacher's top-k ids
FULL_KL = "opd_s_fkl"  # full vocabulary: the exact reverse KL per row (zero at prompt rows)

# full vocabulary: the teacher's final hidden states. Its hook returns them as H per-row keys (TEACHER_HIDDEN_ROW_j);
# its worker merges them into one response-long nested field [n, R_i, H] before they reach TransferQueue
TEACHER_HIDDEN_ROW, TEACHER_HIDDEN = "opd_t_h", "opd_t_hidden"

# the update's targets, written by the driver: nested [n, R_i, C] (C slots), and the teacher's argmax [n, R_i]
TARGET_IDS, TARGET_VALID, TARGET_OLD_LP, TARGET_ADV = "opd_tg_ids", "opd_tg_valid", "opd_tg_old", "opd_tg_adv"
TEACHER_TOP1 = "opd_tg_t_top1"
# USE_KL: the reference's hook returns its log-probs at the C target slots as per-row keys (REF_LP_ROW_j); its
# worker merges them into the response-long target field [n, R_i, C] (TARGET_REF_LP) the update reads
REF_LP_ROW, TARGET_REF_LP = "opd_ref_lp", "opd_tg_ref"
LOSS_MASK = "loss_mask"  # verl counts this field's tokens for its loss normalisation: the core's response mask

# the update hook's outputs, per packed row: log p at each slot (with gradient), and at the teacher's argmax
UPDATE_LP = "opd_lp"
FULL_PG = "opd_full_pg"  # full vocabulary: the per-row surrogate -sum_v A(v), with gradient (zero at prompt rows)
PROBE_LP = "opd_probe_lp"

# extra_info keys describing the target slots (Targets' non-tensor fields)
N_SLOTS, HAS_TAIL, EXTRA_SLOT = "opd_n_slots", "opd_has_tail", "opd_extra_slot"
FULL_VOCAB, HAS_ADV = "opd_full_vocab", "opd_has_adv"  # the full-vocabulary term; slot advantages (None with it)

# metric names the update returns (verl prefixes "actor/"); the driver turns the pair into one mean
PROBE_SUM, PROBE_COUNT = "opd_probe_sum", "opd_probe_count"
PROBE_METRIC = "opd/student_lp_at_teacher_top1"
