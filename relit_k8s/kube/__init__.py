"""Kubernetes: build the Indexed Job (pure, :mod:`.job`) and talk to the API (:mod:`.cluster`)."""
