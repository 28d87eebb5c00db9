"""The pipelines behind the image commands, as library calls with typed configs and summaries.

- `relprop.pipelines.explain`: heatmaps of a classifier for image files (`relprop explain`);
- `relprop.pipelines.detect`: an SSD's detections explained by CRP (`relprop detect`);
- `relprop.pipelines.inputs`: image files and folders expanded into jobs with output folders;
- `relprop.pipelines.outputs`: the output folder and its manifest of written files.

The evaluation's pipeline (`relprop evaluate`) is `relprop.evaluation.classification` (and
`relprop.evaluation.detection`). The CLI only parses the options, builds the config, calls the
pipeline and prints its summary; nothing here imports `relprop.cli`.
"""
