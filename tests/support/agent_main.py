"""The agent process as `launch_agent(..., mail_to_smtp_port=True)` starts it: the real
`portal.agent.server` main, with the appliance's own mail handed to the SMTP port the
stack settings name (an SmtpSink of the test's) instead of the postfix container, as the
unit tier has no docker."""

import sys

from portal.agent.server import main
from tests.support.smtp import send_to_smtp_port

if __name__ == "__main__":
    sys.exit(main(send_mail=send_to_smtp_port))
