"""XLA flags are appended only when jaxlib knows them, and never override the user's."""
from tlflax import xla_env

FLAG = "xla_cpu_experimental_ynn_fusion_type"


def test_appends_to_user_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.delenv("TLFLAX_NO_XLA_FLAGS", raising=False)
  result = xla_env.configure()
  assert result.startswith("--xla_force_host_platform_device_count=2")
  assert (f"--{FLAG}=" in result) == xla_env.jaxlib_knows_flag(FLAG)


def test_user_setting_of_the_same_flag_wins(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", f"--{FLAG}=default")
  assert xla_env.configure() == f"--{FLAG}=default"


def test_unknown_flags_are_never_added(monkeypatch):
  monkeypatch.setattr(xla_env, "CPU_FLAGS", {"xla_cpu_no_such_flag_exists": "1"})
  monkeypatch.setenv("XLA_FLAGS", "")
  assert not xla_env.jaxlib_knows_flag("xla_cpu_no_such_flag_exists")
  assert xla_env.configure() == ""


def test_off_for_other_platforms_and_on_request(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert xla_env.configure() == ""
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("TLFLAX_NO_XLA_FLAGS", "1")
  assert xla_env.configure() == ""
