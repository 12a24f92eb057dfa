"""The real webui started with ``--api-auth``: the extension's status route and its API-form rewriting answer
exactly as the webui's own routes do (401 without valid credentials), and nothing gets past that check."""

from .api_checks import SCRIPT, assert_accelerated

REQUEST = {"prompt": "a red cube", "seed": 1, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}


def test_the_status_route_takes_the_webuis_api_credentials(webui_with_api_auth):
    anonymous, wrong = webui_with_api_auth.as_user(None), webui_with_api_auth.as_user(("alice", "wrong"))
    assert anonymous.request("/sdapi/v1/sd-models")[0] == 401  # the webui's own answer
    assert anonymous.request("/onediff/v1/status")[0] == 401
    assert wrong.request("/onediff/v1/status")[0] == 401
    status, answer = webui_with_api_auth.request("/onediff/v1/status")
    assert status == 200 and answer["busy"] is False


def test_the_api_form_gets_no_request_past_the_webuis_check(webui_with_api_auth):
    anonymous = webui_with_api_auth.as_user(None)
    # without credentials: the webui's 401, whatever the form (not our 422, not a rewritten body)
    assert anonymous.request("/sdapi/v1/txt2img", dict(REQUEST, script=SCRIPT))[0] == 401
    assert anonymous.request("/sdapi/v1/txt2img", dict(REQUEST, script="another_script"))[0] == 401
    # with them: the form is read as without --api-auth
    status, answer = webui_with_api_auth.request("/sdapi/v1/txt2img", dict(REQUEST, script="another_script"))
    assert status == 422 and "another_script" in str(answer)
    assert_accelerated(webui_with_api_auth.post_ok("/sdapi/v1/txt2img", dict(REQUEST, script=SCRIPT)))
