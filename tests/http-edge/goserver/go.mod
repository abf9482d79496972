module fal-serverless/tests/http-edge/goserver

go 1.22
