"""The fairseq ``--user-dir`` plugin of qswap: ``--user-dir $(qswap-plugin-dir)``.

fairseq imports a user dir by its basename as a top-level module, so this folder has a globally
unique name and imports qswap absolutely. It registers qswap's tasks and its distillation
criterion (``qswap_distill``), and lets fairseq's own checkpoint loads work under torch >= 2.6
(an allowlist of the classes fairseq checkpoints contain; see allow_fairseq_checkpoints).
"""
from qswap.integration.distill import register_criterions
from qswap.integration.fairseq_task import allow_fairseq_checkpoints, register_tasks

allow_fairseq_checkpoints()
register_tasks()
register_criterions()
