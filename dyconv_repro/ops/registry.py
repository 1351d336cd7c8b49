"""The operator registry (kept apart from ops/__init__ so operator modules import it without cycles)."""

from dyconv_repro.registry import Registry


class OpRegistry(Registry):
    """Registry of operator classes; registering names the class (`op_name`, the name of its config file
    configs/op/<op_name>.yaml)."""

    def register(self, name: str, help: str | None = None):
        base = super().register(name, help)

        def deco(cls):
            cls = base(cls)
            if "op_name" not in vars(cls):
                cls.op_name = name
            return cls

        return deco


OPS = OpRegistry("operator")
