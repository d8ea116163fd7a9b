"""largo's data plane: the trainer runtime. The only package that imports torch (extra "runtime")."""
