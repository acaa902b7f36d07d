"""The fairseq ``--user-dir`` plugin of qswap: ``--user-dir $(qswap-plugin-dir)``.

fairseq imports a user dir by its basename as a top-level module, so this folder has a globally
unique name and imports qswap absolutely. It only registers qswap's tasks.
"""
from qswap.integration.fairseq_task import register_tasks

register_tasks()
