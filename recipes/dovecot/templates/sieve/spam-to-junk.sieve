# Mailstead: mail that rspamd flagged as spam ("add header": X-Spam: Yes, which
# its milter sets and removes from what the sender sent) is filed into Junk.
require ["fileinto", "mailbox"];

if header :is "X-Spam" "Yes" {
  fileinto :create "Junk";
  stop;
}
