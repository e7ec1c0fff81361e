"""A third-party infra extension distribution, installed into a temp dir by the tests."""
