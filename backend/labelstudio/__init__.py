"""Label Studio's formats and API: label configs, region results, prediction JSON."""
