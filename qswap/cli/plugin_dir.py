"""``qswap-plugin-dir``: print the folder to pass to fairseq's ``--user-dir``."""
import qswap


def main() -> int:
    print(qswap.plugin_dir())
    return 0
