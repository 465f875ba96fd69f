"""Hydra instantiates only launcher classes defined under the `hydra_plugins` namespace, hence these
names; the code is bench/launcher.py."""
from bench import launcher


class SlurmLauncher(launcher.SlurmLauncher):
    pass


class LocalLauncher(launcher.LocalLauncher):
    pass
