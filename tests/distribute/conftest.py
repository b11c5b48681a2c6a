"""Registers the `distributed` marker, so these tests run before setup.cfg lists it."""


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: starts several training processes (tf.distribute); about a minute each on 2 cores.")
