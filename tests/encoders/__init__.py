"""Tests of captioner.encoders stages."""
