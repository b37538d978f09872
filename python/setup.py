"""Builds libflexattn with meson while the package is built, and ships it
inside the package (flexattn/_lib/libflexattn.so), where flexattn._library
loads it. The C sources are the repository this folder sits in."""

import os
import pathlib
import shutil
import subprocess
import sys

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def _tool(name):
    """meson / ninja: the build environment's (PyPI) first, else the system's."""
    scripts = pathlib.Path(sys.executable).parent
    found = scripts / name
    return str(found) if found.exists() else (shutil.which(name) or name)


class BuildWithLibrary(build_py):
    def run(self):
        super().run()
        if not (ROOT / "meson.build").is_file():
            raise RuntimeError(f"the flexattn C sources are not beside {HERE}; build the package "
                               "from the repository (pip install ./python)")
        build_dir = HERE / "build" / "libflexattn"
        env = dict(os.environ)
        if not (build_dir / "build.ninja").exists():
            subprocess.check_call([_tool("meson"), "setup", str(build_dir), str(ROOT),
                                   "-Dtests=disabled", "-Dbuildtype=release"], env=env)
        env["PATH"] = str(pathlib.Path(_tool("ninja")).parent) + os.pathsep + env.get("PATH", "")
        subprocess.check_call([_tool("meson"), "compile", "-C", str(build_dir), "flexattn:shared_library"],
                              env=env)
        built = build_dir / "libflexattn.so"
        target = pathlib.Path(self.build_lib) / "flexattn" / "_lib"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built.resolve(), target / "libflexattn.so")


class BinaryDistribution(Distribution):
    """The wheel holds a shared library: tag it for this platform."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildWithLibrary}, distclass=BinaryDistribution)
